"""What the two edges share (the call pipeline of calls.py), and the Connect edge over HTTP."""

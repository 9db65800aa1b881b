"""The protos are held to the published API (protos/breaking-baseline.binpb) by `buf breaking`
(make protos-check): the check passes for the protos as they are, and refuses a change that
would break callers' generated clients."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.fixtures.process import BIN_DIR
from tests.fixtures.process import REPO_ROOT as ROOT

BUF = BIN_DIR / "buf"
BASELINE = ROOT / "protos" / "breaking-baseline.binpb"


def breaking(workspace: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BUF), "breaking", "--against", str(BASELINE)],
        cwd=workspace,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_protos_keep_the_published_api() -> None:
    done = breaking(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_deleted_field_is_refused(tmp_path: Path) -> None:
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    proto = tmp_path / "protos" / "credits" / "v1" / "credit_service.proto"
    text = proto.read_text()
    assert "  int64 amount = 2;" in text
    proto.write_text(text.replace("  int64 amount = 2;", "  reserved 2;"))
    done = breaking(tmp_path)
    assert done.returncode != 0
    assert 'Previously present field "2" with name "amount"' in done.stdout

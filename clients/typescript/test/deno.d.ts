/** The Deno globals examples/edge_function.ts uses, so that tsc checks it here without Deno. */
declare namespace Deno {
  const env: { get(name: string): string | undefined };
  function serve(handler: (req: Request) => Response | Promise<Response>): unknown;
}

/**
 * A real `credits serve` for the tests: the repository's own `.venv/bin/credits`, in embedded
 * mode over a fresh data dir, on free ports; tokens minted by `credits token` beside it, as a
 * person would. Every wait is bounded and `stop()` always ends the process (SIGKILL, and a
 * fast shutdown of the PostgreSQL it left, if SIGTERM is not enough).
 */
import { execFile, spawn } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, openSync, readFileSync, rmSync, closeSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

const run = promisify(execFile);

const START_TIMEOUT_MS = 30_000;
const STOP_TIMEOUT_MS = 15_000;

/** Variables that would take the server out of embedded mode or change what tests expect. */
const CLEARED = [
  "DATABASE_URL",
  "SUPABASE_URL",
  "SUPABASE_ANON_KEY",
  "SUPABASE_SERVICE_ROLE_KEY",
  "SUPABASE_JWT_SECRET",
  "CREDITS_JWKS_URL",
  "CREDITS_JWT_AUDIENCE",
  "CREDITS_JWT_ISSUER",
  "CREDITS_LISTEN",
  "CREDITS_HTTP_LISTEN",
  "CREDITS_DATA_DIR",
  "CREDITS_SIGNUP_CREDITS",
  "CREDITS_SERVICE_API_KEY",
  "CREDITS_METRICS_LISTEN",
  "CREDITS_PROCESSES",
  "CREDITS_MODELS",
  "CREDITS_TLS_CERT",
  "CREDITS_TLS_KEY",
  "CREDITS_TLS_CLIENT_CA",
];

/** The repository root: the nearest parent of this file holding pyproject.toml and protos/. */
export function repoRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  while (!(existsSync(join(dir, "pyproject.toml")) && existsSync(join(dir, "protos")))) {
    const parent = dirname(dir);
    if (parent === dir) {
      throw new Error("no repository root above " + fileURLToPath(import.meta.url));
    }
    dir = parent;
  }
  return dir;
}

/** A TCP port on 127.0.0.1 that was free a moment ago. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      server.close(() =>
        typeof address === "object" && address !== null
          ? resolve(address.port)
          : reject(new Error("no port")),
      );
    });
  });
}

export class ServeProcess {
  constructor(
    readonly child: ChildProcess,
    readonly grpcPort: number,
    readonly httpPort: number,
    readonly workdir: string,
    readonly env: NodeJS.ProcessEnv,
    readonly credits: string,
  ) {}

  /** The gRPC port's URL (CREDITS_LISTEN). */
  get grpcUrl(): string {
    return `http://127.0.0.1:${this.grpcPort}`;
  }

  /** The Connect edge's URL (CREDITS_HTTP_LISTEN). */
  get httpUrl(): string {
    return `http://127.0.0.1:${this.httpPort}`;
  }

  get dataDir(): string {
    return join(this.workdir, ".data");
  }

  get logPath(): string {
    return join(this.workdir, "serve.log");
  }

  log(): string {
    return existsSync(this.logPath) ? readFileSync(this.logPath, "utf8") : "";
  }

  exited(): boolean {
    return this.child.exitCode !== null || this.child.signalCode !== null;
  }

  /** `credits token <args>` run beside the server (same environment and directory). */
  async token(...args: string[]): Promise<string> {
    const { stdout } = await run(this.credits, ["token", ...args], {
      cwd: this.workdir,
      env: this.env,
      timeout: 30_000,
    });
    const token = stdout.trim();
    if (token.split(".").length !== 3) {
      throw new Error(`credits token ${args.join(" ")} printed ${JSON.stringify(token)}`);
    }
    return token;
  }

  /** SIGTERM and wait; SIGKILL (and stop its PostgreSQL) if it hangs; then remove the dir. */
  async stop(): Promise<void> {
    if (!this.exited()) {
      this.child.kill("SIGTERM");
      if (!(await this.waitExit(STOP_TIMEOUT_MS))) {
        this.child.kill("SIGKILL");
        await this.waitExit(STOP_TIMEOUT_MS);
        this.stopPostgres();
      }
    }
    rmSync(this.workdir, { recursive: true, force: true });
  }

  private waitExit(ms: number): Promise<boolean> {
    if (this.exited()) {
      return Promise.resolve(true);
    }
    return new Promise((resolve) => {
      const timer = setTimeout(() => resolve(false), ms);
      this.child.once("exit", () => {
        clearTimeout(timer);
        resolve(true);
      });
    });
  }

  private stopPostgres(): void {
    const pidFile = join(this.dataDir, "postgres", "postmaster.pid");
    if (!existsSync(pidFile)) {
      return;
    }
    const pid = Number(readFileSync(pidFile, "utf8").split("\n")[0]);
    try {
      process.kill(pid, "SIGINT"); // PostgreSQL's fast shutdown
    } catch {
      // already gone
    }
  }
}

/**
 * Start `credits serve` in a new temporary directory and wait until its JWT secret exists (so
 * `credits token` can sign); `ready` then says when it answers.
 */
export async function startServe(): Promise<ServeProcess> {
  const root = repoRoot();
  const credits = process.env["CREDITS_BIN"] ?? join(root, ".venv", "bin", "credits");
  const workdir = mkdtempSync(join(tmpdir(), "credits-ts-"));
  const [grpcPort, httpPort] = [await freePort(), await freePort()];
  const env: NodeJS.ProcessEnv = { ...process.env };
  for (const name of CLEARED) {
    delete env[name];
  }
  Object.assign(env, {
    CREDITS_LISTEN: `127.0.0.1:${grpcPort}`,
    // The Connect edge's port; a server without the edge ignores it.
    CREDITS_HTTP_LISTEN: `127.0.0.1:${httpPort}`,
    CREDITS_DATA_DIR: join(workdir, ".data"),
    PYTHONUNBUFFERED: "1",
  });
  const log = openSync(join(workdir, "serve.log"), "w");
  const child = spawn(credits, ["serve"], { cwd: workdir, env, stdio: ["ignore", log, log] });
  closeSync(log);
  const server = new ServeProcess(child, grpcPort, httpPort, workdir, env, credits);
  try {
    await waitFor(server, "its JWT secret", () => existsSync(join(server.dataDir, "jwt_secret")));
  } catch (err) {
    await server.stop();
    throw err;
  }
  return server;
}

/** Retry `probe` until it resolves (the server answers), failing with the server's log. */
export async function waitReady(server: ServeProcess, probe: () => Promise<unknown>): Promise<void> {
  let last: unknown = "no answer yet";
  await waitFor(server, "an answer", async () => {
    try {
      await probe();
      return true;
    } catch (err) {
      last = err;
      return false;
    }
  }).catch((err: unknown) => {
    throw new Error(`${String(err)}; last error: ${String(last)}`);
  });
}

async function waitFor(
  server: ServeProcess,
  what: string,
  done: () => boolean | Promise<boolean>,
): Promise<void> {
  const deadline = Date.now() + START_TIMEOUT_MS;
  while (!(await done())) {
    if (server.exited()) {
      throw new Error(`credits serve exited while waiting for ${what}\n${server.log()}`);
    }
    if (Date.now() > deadline) {
      throw new Error(`no ${what} from credits serve in ${START_TIMEOUT_MS} ms\n${server.log()}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

"""LiteLLM as `bench.py` runs it: the proxy with virtual keys on PostgreSQL and Redis.

A LiteLLM proxy with only a master key checks one string per request. tokenmart checks a key
record, limits and credit on every request, so the fair peer is LiteLLM's own equivalent:
virtual keys kept in PostgreSQL (through Prisma), usage and rate-limit counters shared on
Redis, and one `sk-` key made by `/key/generate` with a budget and rpm/tpm limits, which
the benchmark's requests carry. LiteLLM then authenticates the key, checks its budget and
limits, and records its spend on each request, as tokenmart does.

Everything comes from the registries these machines reach: LiteLLM and Prisma Client Python
from PyPI (into `.venv-litellm`), PostgreSQL from Debian, and the Prisma query engine from
npm as Prisma's WebAssembly build, served by `litellm_query_engine.mjs` in place of the
native binary that only Prisma's own download host has. The schema is LiteLLM's own
migrations (shipped in `litellm-proxy-extras`), applied with psql.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
from rich.console import Console

HERE = Path(__file__).resolve().parent
LITELLM_VENV = HERE.parent / ".venv-litellm"
# extra_proxy brings Prisma Client Python, which the proxy needs for virtual keys.
LITELLM_REQUIREMENT = "litellm[proxy,extra_proxy]==1.108.7"  # what resolves beside these registries
# The WebAssembly build of the engine commit Prisma Client Python 0.15 expects (Prisma 5.17.0).
ENGINE_PACKAGES = [
    "@prisma/query-engine-wasm@5.17.0-31.393aa359c9ad4a4bb28630fb5613f9c281cde053",
    "@prisma/adapter-pg@5.17.0",
    "@prisma/driver-adapter-utils@5.17.0",
    "pg@8",
]
ENGINE_DIR = LITELLM_VENV / "query-engine"
ENGINE_WRAPPER = ENGINE_DIR / "query-engine"
PRISMA_CACHE = LITELLM_VENV / "prisma-cache"
MASTER_KEY = "sk-bench-litellm-master"
SETUP = "virtual key (max_budget, rpm, tpm) on PostgreSQL {version} + Redis"
console = Console()

Spawn = Callable[[str, list[str], dict[str, str]], subprocess.Popen]


def _run(argv: list[str], what: str, env: dict[str, str] | None = None) -> str:
    """Runs one setup step; on failure, shows its output instead of a bare exit status."""
    result = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return result.stdout


def site_packages() -> Path:
    return next((LITELLM_VENV / "lib").glob("python3*/site-packages"))


def prisma_env() -> dict[str, str]:
    """What Prisma Client Python and its CLI need to run offline: our engine, a private cache,
    and the venv's `prisma-client-py` generator on PATH."""
    return {
        "PRISMA_QUERY_ENGINE_BINARY": str(ENGINE_WRAPPER),
        "PRISMA_SCHEMA_ENGINE_BINARY": str(ENGINE_WRAPPER),
        "PRISMA_BINARY_CACHE_DIR": str(PRISMA_CACHE),
        "PRISMA_ENGINES_CHECKSUM_IGNORE_MISSING": "1",
        "PRISMA_HIDE_UPDATE_MESSAGE": "1",
        "CHECKPOINT_DISABLE": "1",
        "PATH": f"{LITELLM_VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def ensure_litellm() -> Path:
    """The proxy, its Prisma client generated against LiteLLM's schema, and the query engine,
    installed on first use (each step only when its result is missing)."""
    binary = LITELLM_VENV / "bin" / "litellm"
    python = str(LITELLM_VENV / "bin" / "python")
    if not binary.exists():
        with console.status(f"installing the LiteLLM proxy into {LITELLM_VENV.name} ({LITELLM_REQUIREMENT})"):
            _run([sys.executable, "-m", "venv", str(LITELLM_VENV)], "creating the LiteLLM venv")
    if subprocess.run([python, "-c", "import prisma"], capture_output=True).returncode != 0:
        with console.status(f"installing {LITELLM_REQUIREMENT} into {LITELLM_VENV.name}"):
            _run([str(LITELLM_VENV / "bin" / "pip"), "install", "-q", LITELLM_REQUIREMENT], "pip install")
    if not (ENGINE_DIR / "node_modules" / "@prisma" / "query-engine-wasm").exists():
        with console.status(f"installing the Prisma query engine (WebAssembly) from npm into {ENGINE_DIR}"):
            ENGINE_DIR.mkdir(parents=True, exist_ok=True)
            npm = ["npm", "install", "--prefix", str(ENGINE_DIR), "--no-audit", "--no-fund", *ENGINE_PACKAGES]
            _run(npm, "npm install of the query engine")
    ENGINE_WRAPPER.write_text(
        "#!/bin/sh\n"
        f'TOKENMART_ENGINE_MODULES="{ENGINE_DIR / "node_modules"}" '
        f'exec node "{HERE / "litellm_query_engine.mjs"}" "$@"\n'
    )
    ENGINE_WRAPPER.chmod(0o755)
    if not (site_packages() / "prisma" / "client.py").exists():
        schema = site_packages() / "litellm" / "proxy" / "schema.prisma"
        with console.status("generating LiteLLM's Prisma client (prisma generate, offline)"):
            _run([python, "-m", "prisma", "generate", "--schema", str(schema)], "prisma generate", prisma_env())
    return binary


def postgres_bin() -> Path:
    """PostgreSQL's server programs, installed from Debian on first use."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        with console.status("installing PostgreSQL (apt-get install -y postgresql) for LiteLLM's virtual keys"):
            env = {"DEBIAN_FRONTEND": "noninteractive"}
            _run(["apt-get", "update", "-q"], "apt-get update", env)
            _run(["apt-get", "install", "-y", "-q", "postgresql"], "apt-get install postgresql", env)
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent


@dataclass
class Postgres:
    """A private PostgreSQL server: its own data directory and loopback port, stopped on exit.

    PostgreSQL refuses to run as root, so as root it runs as the `postgres` user that the
    Debian package creates."""

    bin: Path
    data: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/litellm"

    @property
    def version(self) -> str:
        return self.bin.parent.name

    def _as_owner(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv

    def start(self, stack: ExitStack) -> None:
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.data, owner.pw_uid, owner.pw_gid)
        stack.callback(shutil.rmtree, self.data, True)
        pgdata = str(self.data / "pgdata")
        initdb = [str(self.bin / "initdb"), "-D", pgdata, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"]
        _run(self._as_owner(initdb), "initdb")
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1"
        start = [str(self.bin / "pg_ctl"), "-D", pgdata, "-l", str(self.data / "postgres.log"), "-o", options]
        _run(self._as_owner([*start, "-w", "start"]), "pg_ctl start")
        stop = [str(self.bin / "pg_ctl"), "-D", pgdata, "-m", "fast", "-w", "stop"]
        stack.callback(subprocess.run, self._as_owner(stop), capture_output=True)
        _run(self._psql("postgres", "-c", "CREATE DATABASE litellm"), "createdb litellm")

    def _psql(self, database: str, *args: str) -> list[str]:
        base = [str(self.bin / "psql"), "-X", "-q", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"]
        return [*base, "-d", database, *args]

    def apply_litellm_schema(self) -> None:
        """LiteLLM's own migrations, in order, in one psql session (what `prisma migrate deploy`
        would apply, without Prisma's schema engine)."""
        migrations = sorted((site_packages() / "litellm_proxy_extras" / "migrations").glob("*/migration.sql"))
        script = self.data / "migrate.sql"
        script.write_text("SET client_min_messages = error;\n" + "".join(f"\\i '{path}'\n" for path in migrations))
        _run(self._psql("litellm", "-v", "ON_ERROR_STOP=1", "-f", str(script)), "applying LiteLLM's migrations")


def start_postgres(stack: ExitStack, port: int) -> Postgres:
    bin_dir = postgres_bin()
    data = Path(tempfile.mkdtemp(prefix="tokenmart-bench-pg-"))
    server = Postgres(bin_dir, data, port)
    with console.status(f"starting PostgreSQL {server.version} on port {port} and applying LiteLLM's schema"):
        server.start(stack)
        server.apply_litellm_schema()
    return server


def litellm_config(model: str, engine_base_url: str, pricing: tuple[float, float], redis_port: int) -> dict:
    """The proxy's config: the engine as its one model, priced like the listing (so spend and
    budgets are real numbers), virtual keys on, and counters on Redis."""
    prompt_per_token, completion_per_token = pricing
    return {
        "model_list": [
            {
                "model_name": model,
                "litellm_params": {
                    "model": f"openai/{model}",
                    "api_base": engine_base_url,
                    "api_key": "none",
                    "input_cost_per_token": prompt_per_token,
                    "output_cost_per_token": completion_per_token,
                },
            }
        ],
        "general_settings": {
            "master_key": MASTER_KEY,
            # Usage and rate-limit counters shared on Redis, as for several proxy instances.
            "coordination_redis": {"host": "127.0.0.1", "port": redis_port},
        },
        "litellm_settings": {"drop_params": True, "telemetry": False},
    }


def litellm_env(database_url: str, redis_port: int) -> dict[str, str]:
    return {
        **prisma_env(),
        "DATABASE_URL": database_url,
        "REDIS_HOST": "127.0.0.1",
        "REDIS_PORT": str(redis_port),
        # The schema is applied from LiteLLM's migrations before start; Prisma's schema engine
        # (native only) is not there to run `prisma migrate deploy`.
        "DISABLE_SCHEMA_UPDATE": "true",
        "LITELLM_LOG": "ERROR",
    }


def generate_key(base_url: str, model: str, **limits: float) -> str:
    """One `sk-` virtual key from LiteLLM's `/key/generate`, stored in PostgreSQL."""
    body = {"key_alias": f"bench-{limits.get('rpm_limit')}", "models": [model], **limits}
    response = httpx.post(
        f"{base_url}/key/generate", json=body, headers={"authorization": f"Bearer {MASTER_KEY}"}, timeout=60
    )
    response.raise_for_status()
    return response.json()["key"]


def key_info(base_url: str, key: str) -> dict:
    """The key's record as LiteLLM's database has it (spend, budget, limits)."""
    response = httpx.get(
        f"{base_url}/key/info", params={"key": key}, headers={"authorization": f"Bearer {MASTER_KEY}"}, timeout=30
    )
    response.raise_for_status()
    return response.json()["info"]

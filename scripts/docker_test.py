#!/usr/bin/env python3
"""`make docker-test`: build the serving image and run it for real (SPEC section 13).

As root on a machine like CI's (Debian's docker.io, no image registry, package registries behind a
TLS-re-signing proxy):
  1. use the Docker daemon that answers, or start one (vfs storage, no iptables, no bridge) with its data
     root, exec root and socket in a directory of its own, stopped and removed afterwards;
  2. make the base image `debian:bookworm-slim` with debootstrap from apt's configured mirror and
     `docker import` it, when the daemon lacks it;
  3. build with `--network host` and the BuildKit secret `pip_ca` (the system CA bundle);
  4. run it with `--network host` (never a bridge network) and the tiny model mounted read-only at
     /mnt/models, and check: the server is PID 1 as uid 1000, code and model not writable, no bytecode,
     HEALTHCHECK healthy, ready, a v1 predict, a job and its event stream to `succeeded`, nothing written
     under the model directory, `docker stop` exits 0 within the grace period;
  5. print the build time and the image size, and leave no container, image or build cache behind.

Python's standard library only (it runs before and without the project's virtualenv). Exit status 0
when every check passed, 1 on a failed check, 2 when Docker cannot be used at all.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEBIAN_BASE = "debian:bookworm-slim"
DEBIAN_SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
MODEL_MOUNT = "/mnt/models"
UID = "1000"
QUERY = "кот"


class CheckFailed(Exception):
    """A check of the image failed; the message says which and why."""


def log(msg: str) -> None:
    sys.stdout.write(f"docker-test: {msg}\n")
    sys.stdout.flush()


PASSED: list[str] = []


def passed(msg: str) -> None:
    """A check that passed: logged, and counted in the closing `N passed, N failed` line."""
    PASSED.append(msg)
    log(msg)


def _version() -> str:
    m = re.search(r'__version__ = "(.+)"', (REPO / "app" / "__init__.py").read_text(encoding="utf-8"))
    assert m, "app/__init__.py has no __version__"
    return m.group(1)


def _git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tree_state(root: Path) -> str:
    """Every path under root with its size, mtime and mode: equal before and after means nothing written."""
    lines = []
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        lines.append(f"{path.relative_to(root)} {st.st_size} {st.st_mtime_ns} {st.st_mode:o}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


# --------------------------------------------------------------------------------------------- apt


def apt_mirrors(etc: Path = Path("/etc/apt")) -> tuple[str, str | None]:
    """(the Debian mirror, the security mirror or None) of apt's configured sources for bookworm."""
    entries: list[tuple[str, list[str]]] = []  # (URI, suites) of every enabled `deb` source
    for path in sorted(etc.glob("sources.list.d/*.sources")):
        for para in re.split(r"\n\s*\n", path.read_text(encoding="utf-8", errors="replace")):
            fields = dict(re.findall(r"^([A-Za-z-]+):[ \t]*(.*)$", para, re.M))
            if "deb" in fields.get("Types", "").split() and fields.get("Enabled", "yes") != "no":
                for uri in fields.get("URIs", "").split():
                    entries.append((uri, fields.get("Suites", "").split()))
    for path in [etc / "sources.list", *sorted(etc.glob("sources.list.d/*.list"))]:
        if path.is_file():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                m = re.match(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
                if m:
                    entries.append((m.group(1), [m.group(2)]))
    main = next((u for u, suites in entries if DEBIAN_SUITE in suites), DEFAULT_MIRROR)
    security = next((u for u, suites in entries if f"{DEBIAN_SUITE}-security" in suites), None)
    return main.rstrip("/"), security.rstrip("/") if security else None


# ------------------------------------------------------------------------------------------ docker


class Docker:
    """The docker client, talking to the daemon that answered or to the one started here."""

    def __init__(self, client: str) -> None:
        self.client = client
        self.env = dict(os.environ, DOCKER_BUILDKIT="1")
        self.daemon: subprocess.Popen[bytes] | None = None
        self.workdir: Path | None = None

    def run(self, *args: str, check: bool = True, capture: bool = True, timeout: float | None = None,
            stdin: Any = None) -> subprocess.CompletedProcess[str]:
        out = subprocess.run([self.client, *args], env=self.env, text=True, timeout=timeout, stdin=stdin,
                             stdout=subprocess.PIPE if capture else None,
                             stderr=subprocess.PIPE if capture else None)
        if check and out.returncode != 0:
            raise CheckFailed(f"`docker {' '.join(args[:3])} ...` exited {out.returncode}: "
                              f"{(out.stderr or '').strip()[-2000:]}")
        return out

    def answers(self) -> bool:
        try:
            return self.run("info", check=False, timeout=30).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def start_daemon(self, workdir: Path) -> None:
        dockerd = shutil.which("dockerd")
        if dockerd is None:
            raise CheckFailed("no Docker daemon answers and dockerd is not installed "
                              "(apt-get install docker.io)")
        sock = workdir / "docker.sock"
        cmd = [dockerd, "--storage-driver=vfs", "--iptables=false", "--bridge=none",
               f"--data-root={workdir / 'data'}", f"--exec-root={workdir / 'exec'}",
               f"--pidfile={workdir / 'dockerd.pid'}", f"--host=unix://{sock}"]
        log(f"starting {' '.join(cmd)}")
        self.workdir = workdir
        with open(workdir / "dockerd.log", "wb") as out:
            self.daemon = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.env["DOCKER_HOST"] = f"unix://{sock}"
        deadline = time.monotonic() + 60
        while not self.answers():
            if self.daemon.poll() is not None or time.monotonic() > deadline:
                tail = (workdir / "dockerd.log").read_text(errors="replace")[-3000:]
                raise CheckFailed(f"dockerd did not come up:\n{tail}")
            time.sleep(0.5)

    def stop_daemon(self) -> None:
        if self.daemon is None:
            return
        self.daemon.send_signal(signal.SIGTERM)
        try:
            self.daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
            self.daemon.wait()
        log(f"stopped the Docker daemon started here (exit {self.daemon.returncode})")
        self.daemon = None

    def has_image(self, ref: str) -> bool:
        return self.run("image", "inspect", ref, check=False).returncode == 0


def make_debian_base(docker: Docker, workdir: Path) -> None:
    """debian:bookworm-slim from apt's configured mirror: debootstrap (minbase), then `docker import`."""
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None:
        raise CheckFailed(f"{DEBIAN_BASE} is absent and debootstrap is not installed "
                          "(apt-get install debootstrap)")
    mirror, security = apt_mirrors()
    root = workdir / "rootfs"
    log(f"{DEBIAN_BASE} absent: debootstrap --variant=minbase {DEBIAN_SUITE} from {mirror}")
    t0 = time.monotonic()
    out = subprocess.run([debootstrap, "--variant=minbase", DEBIAN_SUITE, str(root), mirror],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise CheckFailed(f"debootstrap failed:\n{(out.stdout + out.stderr)[-3000:]}")
    sources = [f"deb {mirror} {DEBIAN_SUITE} main", f"deb {mirror} {DEBIAN_SUITE}-updates main"]
    if security:
        sources.append(f"deb {security} {DEBIAN_SUITE}-security main")
    (root / "etc/apt/sources.list").write_text("\n".join(sources) + "\n")
    # What the published slim image does: no docs, man pages or translations from later installs, and
    # no .deb files or package lists kept.
    (root / "etc/dpkg/dpkg.cfg.d/docker-slim").write_text(
        "path-exclude /usr/share/doc/*\npath-include /usr/share/doc/*/copyright\n"
        "path-exclude /usr/share/man/*\npath-exclude /usr/share/info/*\npath-exclude /usr/share/locale/*\n")
    (root / "etc/apt/apt.conf.d/docker-clean").write_text(
        'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };\n'
        'Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";\n')
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*"):
        for path in root.glob(pattern):
            if path.is_file():
                path.unlink()
    tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    docker.run("import", "--change", 'CMD ["bash"]', "-", DEBIAN_BASE, stdin=tar.stdout)
    assert tar.stdout is not None
    tar.stdout.close()
    if tar.wait() != 0:
        raise CheckFailed("tar of the debootstrap root failed")
    shutil.rmtree(root)
    log(f"made {DEBIAN_BASE} in {time.monotonic() - t0:.0f} s")


# -------------------------------------------------------------------------------------------- http


def http(method: str, url: str, body: Any = None, timeout: float = 300) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def job_events(url: str, timeout: float) -> list[tuple[str, Any]]:
    """The events of a job's stream up to its final one."""
    events: list[tuple[str, Any]] = []
    name, data = "", []
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Accept": "text/event-stream"}),
                                timeout=timeout) as resp:
        for raw in resp:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
            elif not line and (name or data):
                events.append((name or "message", json.loads("\n".join(data)) if data else None))
                if name in ("succeeded", "failed", "cancelled"):
                    break
                name, data = "", []
    return events


def _images(answer: Any) -> list[str]:
    if not isinstance(answer, dict):
        return []
    predictions = answer.get("predictions", [answer])
    return [img for p in predictions if isinstance(p, dict) for img in p.get("images", [])]


# ------------------------------------------------------------------------------------------ checks


def check_image_config(docker: Docker, ref: str, version: str) -> dict[str, Any]:
    (info,) = json.loads(docker.run("image", "inspect", ref).stdout)
    cfg = info["Config"]
    if cfg.get("User", "").split(":")[0] != UID:
        raise CheckFailed(f"the image's USER is {cfg.get('User')!r}, not {UID}")
    if cfg.get("Entrypoint") != ["python", "-m", "app"]:
        raise CheckFailed(f"ENTRYPOINT {cfg.get('Entrypoint')!r} is not the exec form of `python -m app`")
    health = " ".join((cfg.get("Healthcheck") or {}).get("Test", []))
    if "/v2/health/live" not in health:
        raise CheckFailed(f"HEALTHCHECK {health!r} does not probe /v2/health/live")
    labels = cfg.get("Labels") or {}
    for key in ("version", "source", "licenses", "revision"):
        if not labels.get(f"org.opencontainers.image.{key}"):
            raise CheckFailed(f"label org.opencontainers.image.{key} missing")
    if labels["org.opencontainers.image.version"] != version:
        raise CheckFailed(f"label version {labels['org.opencontainers.image.version']!r} is not {version}")
    return info


def run_checks(docker: Docker, ref: str, model_dir: Path, stop_timeout: int, ready_timeout: float,
               state: dict[str, Any]) -> None:
    port, grpc_port = _free_port(), _free_port()
    base = f"http://127.0.0.1:{port}"
    flags = ["--model_dir", MODEL_MOUNT, "--model_name", "kandinsky", "--device", "cpu", "--dtype", "fp32",
             "--http_port", str(port), "--grpc_port", str(grpc_port)]
    # Host networking: bind loopback only, where the server has the flags for it.
    if "http_host" in (REPO / "app/serving/core/settings.py").read_text(encoding="utf-8"):
        flags += ["--http_host", "127.0.0.1", "--grpc_host", "127.0.0.1"]
    before = _tree_state(model_dir)
    name = f"kandinsky-docker-test-{os.getpid()}"
    docker.run("run", "-d", "--name", name, "--network", "host",
               "--volume", f"{model_dir}:{MODEL_MOUNT}:ro",
               "--env", f"HEALTHCHECK_PORT={port}", "--health-interval", "2s",
               ref, *flags)
    state["container"] = name
    log(f"started {name} (--network host, {model_dir} at {MODEL_MOUNT}:ro, port {port})")

    t0 = time.monotonic()
    while True:
        with contextlib.suppress(OSError):
            if http("GET", f"{base}/v2/health/ready", timeout=5)[0] == 200:
                break
        running = docker.run("inspect", "-f", "{{.State.Running}}", name).stdout.strip()
        if running != "true":
            raise CheckFailed("the container exited before it was ready")
        if time.monotonic() - t0 > ready_timeout:
            raise CheckFailed(f"not ready after {ready_timeout:.0f} s")
        time.sleep(1)
    passed(f"ready after {time.monotonic() - t0:.1f} s")

    # The server is PID 1 (exec form: it gets SIGTERM itself), and runs as uid 1000.
    uid = docker.run("exec", name, "id", "-u").stdout.strip()
    status = docker.run("exec", name, "cat", "/proc/1/status").stdout
    uids = re.search(r"^Uid:\s+(.*)$", status, re.M)
    cmdline = docker.run("exec", name, "cat", "/proc/1/cmdline").stdout.split("\0")
    if uid != UID or not uids or set(uids.group(1).split()) != {UID}:
        raise CheckFailed(f"the server runs as uid {uid!r} (PID 1 Uid: {uids and uids.group(1)!r}), "
                          f"not {UID}")
    if cmdline[:3] != ["python", "-m", "app"]:
        raise CheckFailed(f"PID 1 is {cmdline!r}, not the server")
    passed(f"PID 1 is `python -m app` as uid {uid}")

    # Code, venv and model are not writable by the server's user; no bytecode or pip cache in the image.
    for path in ("/srv/app", "/srv/app/__main__.py", "/opt/venv", "/opt/venv/bin/python", MODEL_MOUNT):
        if docker.run("exec", name, "test", "-w", path, check=False).returncode == 0:
            raise CheckFailed(f"{path} is writable by uid {UID}")
    found = docker.run("exec", "--user", "0", name, "find", "/opt/venv", "/srv", "/usr/lib/python3.11",
                       "/root", "/home/app", "(", "-name", "__pycache__", "-o", "-name", "*.pyc", "-o",
                       "-path", "*/.cache/pip", ")", "-print", "-quit").stdout.strip()
    if found:
        raise CheckFailed(f"bytecode or pip cache in the image: {found}")
    passed("code, venv and /mnt/models are read-only to uid 1000; no bytecode or pip cache in the image")

    # The image's own HEALTHCHECK command (interval shortened for the test) reports healthy.
    t0 = time.monotonic()
    health_of = ("inspect", "-f", "{{.State.Health.Status}}", name)
    while (health := docker.run(*health_of).stdout.strip()) != "healthy":
        if time.monotonic() - t0 > 60:
            raise CheckFailed(f"HEALTHCHECK status {health!r} after 60 s")
        time.sleep(1)
    passed("HEALTHCHECK: healthy")

    params = {"images_to_gen": 1, "images_to_cherry_pick": 1, "super_res": False}
    body = {"instances": [{"query": QUERY, "params": params}]}
    code, answer = http("POST", f"{base}/v1/models/kandinsky:predict", body)
    if code != 200 or len(_images(answer)) != 1:
        raise CheckFailed(f"v1 predict: {code} {str(answer)[:500]}")
    passed("v1 predict: 200, 1 image")

    code, job = http("POST", f"{base}/v1/models/kandinsky/jobs", body)
    if code != 202 or not isinstance(job, dict) or "id" not in job:
        raise CheckFailed(f"job submit: {code} {str(job)[:500]}")
    events = job_events(f"{base}/v1/models/kandinsky/jobs/{job['id']}/events", timeout=300)
    names = [e for e, _ in events]
    if not names or names[0] != "status" or names[-1] != "succeeded" or len(_images(events[-1][1])) != 1:
        raise CheckFailed(f"job events {names}: not status first and succeeded with 1 image last")
    passed(f"job {job['id']}: events {' '.join(dict.fromkeys(names))}")

    if _tree_state(model_dir) != before:
        raise CheckFailed(f"something was written under {model_dir} (mounted at {MODEL_MOUNT})")
    passed(f"nothing written under {MODEL_MOUNT}")

    t0 = time.monotonic()
    docker.run("stop", "--time", str(stop_timeout), name, timeout=stop_timeout + 60)
    took = time.monotonic() - t0
    code_s = docker.run("inspect", "-f", "{{.State.ExitCode}} {{.State.OOMKilled}}", name).stdout.split()
    if code_s[0] != "0" or took >= stop_timeout:
        tail = docker.run("logs", "--tail", "30", name, check=False).stderr
        raise CheckFailed(f"`docker stop`: exit {code_s[0]} after {took:.1f} s "
                          f"(grace {stop_timeout} s)\n{tail}")
    state["stop_s"] = round(took, 1)
    passed(f"docker stop: exit 0 in {took:.1f} s (grace {stop_timeout} s)")


# -------------------------------------------------------------------------------------------- main


def _client() -> str | None:
    # Debian's docker.io client has BuildKit built in; a newer CLI needs the buildx plugin for it.
    for client in (os.environ.get("DOCKER"), "/usr/bin/docker", shutil.which("docker")):
        if client and os.access(client, os.X_OK):
            return client
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="kandinsky-serving", help="repository of the image built")
    parser.add_argument("--model_dir", default=str(REPO / "model_store" / "tiny"),
                        help="model directory mounted read-only at /mnt/models (make tiny)")
    parser.add_argument("--base_image", default=DEBIAN_BASE, help="the Dockerfile's BASE_IMAGE")
    parser.add_argument("--pip_ca", default="/etc/ssl/certs/ca-certificates.crt",
                        help="CA bundle passed as the pip_ca build secret ('' for none)")
    parser.add_argument("--stop_timeout", type=int, default=30, help="docker stop's grace period, s")
    parser.add_argument("--ready_timeout", type=float, default=600, help="seconds to become ready")
    parser.add_argument("--workdir", default="/var/tmp", help="where the daemon's and debootstrap's "
                        "directory is made (vfs stores every layer in full: room for about 20 GB)")
    args = parser.parse_args()
    model_dir = Path(args.model_dir).resolve()
    if not (model_dir / "model.json").is_file():
        log(f"{model_dir} holds no model.json (make tiny)")
        return 2
    client = _client()
    if client is None:
        log("no docker client (apt-get install docker.io)")
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    version = _version()
    ref = f"{args.image}:{version}-docker-test"
    docker = Docker(client)
    workdir = Path(tempfile.mkdtemp(prefix="kandinsky-docker-test.", dir=args.workdir))
    state: dict[str, Any] = {}
    made_base = False
    t_all = time.monotonic()
    rc = 1
    summary: dict[str, Any] = {}
    size = 0
    try:
        if docker.answers():
            log(f"using the Docker daemon that answers ({docker.env.get('DOCKER_HOST', 'default socket')})")
        else:
            docker.start_daemon(workdir)
        if not docker.has_image(args.base_image):
            if args.base_image != DEBIAN_BASE:
                raise CheckFailed(f"{args.base_image} is absent (only {DEBIAN_BASE} is made here)")
            make_debian_base(docker, workdir)
            made_base = True
        build = ["build", "--network", "host", "--progress", "plain",
                 "--build-arg", f"BASE_IMAGE={args.base_image}", "--build-arg", f"VERSION={version}",
                 "--build-arg", f"REVISION={_git('rev-parse', 'HEAD') or 'unknown'}",
                 "--build-arg", f"SOURCE_URL={_git('config', '--get', 'remote.origin.url') or 'unknown'}",
                 "--tag", ref]
        if args.pip_ca:
            build += ["--secret", f"id=pip_ca,src={args.pip_ca}"]
        log(f"docker {' '.join(build)} .")
        t0 = time.monotonic()
        state["image"] = ref
        out = docker.run(*build, str(REPO), check=False, capture=False)
        build_s = time.monotonic() - t0
        if out.returncode != 0:
            raise CheckFailed(f"docker build exited {out.returncode} after {build_s:.0f} s")
        info = check_image_config(docker, ref, version)
        size = int(info["Size"])
        passed(f"built {ref} in {build_s:.0f} s: {size / 1e9:.2f} GB ({size} bytes)")
        run_checks(docker, ref, model_dir, args.stop_timeout, args.ready_timeout, state)
        rc = 0
        summary.update(build_s=round(build_s), image_bytes=size, stop_s=state.get("stop_s"))
    except CheckFailed as exc:
        log(f"FAILED: {exc}")
        if "container" in state:
            logs = docker.run("logs", "--tail", "40", state["container"], check=False)
            sys.stderr.write((logs.stdout or "") + (logs.stderr or ""))
    finally:
        cleanup(docker, state, args.base_image if made_base else None, workdir)
    if rc == 0:
        summary["total_s"] = round(time.monotonic() - t_all)
        log(f"OK: build {summary['build_s']} s, image {size / 1e9:.2f} GB, docker stop "
            f"{summary['stop_s']} s, whole docker-test {summary['total_s']} s")
        log(json.dumps(summary))
    sys.stdout.write(f"docker-test: {len(PASSED)} passed, {1 if rc else 0} failed\n")
    return rc


def cleanup(docker: Docker, state: dict[str, Any], base: str | None, workdir: Path) -> None:
    """No container, image or build cache left behind; the daemon started here stopped, its files gone."""
    with contextlib.suppress(Exception):
        if "container" in state:
            docker.run("rm", "--force", "--volumes", state["container"], check=False)
        if "image" in state:
            docker.run("image", "rm", "--force", state["image"], check=False)
        if base:
            docker.run("image", "rm", "--force", base, check=False)
        # The build's cache: everything when the daemon is ours, what nothing uses on a shared one.
        docker.run("builder", "prune", "--force", *(["--all"] if docker.daemon else []), check=False)
        if docker.daemon:
            left = docker.run("system", "df", check=False).stdout
            log("left in the daemon before it stops:\n" + left.rstrip())
    docker.stop_daemon()
    # Mounts a killed daemon may leave (none with vfs and host networking, but rmtree must not cross one).
    with contextlib.suppress(OSError):
        mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
        for mount in sorted((m for m in mounts if m.startswith(str(workdir) + "/")), reverse=True):
            subprocess.run(["umount", "-l", mount], check=False)
    shutil.rmtree(workdir, ignore_errors=True)
    if workdir.exists():
        log(f"could not remove {workdir}")
    else:
        log(f"removed {workdir}")


if __name__ == "__main__":
    sys.exit(main())

"""Command-line client: run one generation as a job on a Kandinsky server and save its images.

    python -m app.client "кот в шляпе" --url http://127.0.0.1:8080 --images_to_gen 8 --out out/cat

It submits a job with its event stream (SPEC section 7), shows a progress bar from the `progress`
events, then saves the kept images (best first, named by rank, the extension from the image format)
and `result.json` (the predict response without the base64 images, plus `files` and `job_id`), and
writes their paths to stdout. Exit status: 0 saved; 1 the server refused or failed the job (its
message on stderr); 2 bad arguments; 130 interrupted: Ctrl-C cancels the job on the server first.

A server with API keys (SPEC section 12) needs one: `--api-key KEY`, or the environment variable
`KANDINSKY_API_KEY` (better: a flag shows in the process list), sent as `Authorization: Bearer KEY` on
every request and never written anywhere.

Light on purpose (httpx, httpx-sse, tqdm): it runs on any machine that can reach the server.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from httpx_sse import SSEError, connect_sse
from tqdm import tqdm

FORMATS = ("jpeg", "png", "webp")
FINAL_EVENTS = ("succeeded", "failed", "cancelled")
# The server sends a keep-alive comment at least every 15 s: a read that waits longer has lost it.
READ_TIMEOUT_S = 60.0
RECONNECTS = 5
EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
API_KEY_ENV = "KANDINSKY_API_KEY"
_SIGNATURES = ((b"\x89PNG", "png"), (b"\xff\xd8", "jpg"), (b"RIFF", "webp"))


class ClientError(Exception):
    """A failure to report in one line on stderr (exit status 1)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m app.client",
        description="Generate images on a Kandinsky server as a job, with a progress bar; Ctrl-C cancels.",
    )
    parser.add_argument("query", help="the text prompt")
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="the server (default %(default)s)")
    parser.add_argument("--model", help="the model name (default: the one GET /v1/models lists)")
    parser.add_argument("--api-key", "--api_key", dest="api_key", metavar="KEY",
                        help=f"the API key of a server with --api_keys (default: ${API_KEY_ENV}, which is "
                             "better: a flag shows in the process list)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the images and result.json")
    parser.add_argument("--images_to_gen", type=int, help="images to sample (server default 8)")
    parser.add_argument("--images_to_cherry_pick", type=int, help="of those, how many to keep, best by CLIP")
    parser.add_argument("--seed", type=int, help="0 .. 2**63-1 (default: random; result.json has it)")
    parser.add_argument("--top_k", type=int, help="keep the k likeliest image tokens (1 .. image vocabulary)")
    parser.add_argument("--top_p", type=float, help="nucleus filtering, 0 < p <= 1 (server default 0.975)")
    parser.add_argument("--temperature", type=float, help="0 < t <= 10 (server default 1.0)")
    parser.add_argument("--super_res", action=argparse.BooleanOptionalAction, default=None,
                        help="upscale x4 (server default: on)")
    parser.add_argument("--format", choices=FORMATS, help="image format (server default jpeg)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def request_body(args: argparse.Namespace) -> dict[str, Any]:
    """The predict body of one instance, with only the parameters given (the server has the defaults)."""
    names = ("images_to_gen", "images_to_cherry_pick", "seed", "top_k", "top_p", "temperature",
             "super_res", "format")
    params = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    return {"instances": [{"query": args.query, "params": params}]}


def error_message(response: httpx.Response) -> str:
    """The server's own words for a refused request: `{"error": ...}` (or OpenAI's shape), else the body;
    a 401 says how to pass a key."""
    response.read()
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        error = error.get("message")
    text = str(error) if error else (response.text.strip()[:500] or response.reason_phrase)
    if response.status_code == 401:
        if _sent_key(response):
            hint = f"the server did not accept the API key: check --api-key or {API_KEY_ENV}"
        else:
            hint = f"the server needs an API key: pass --api-key KEY or set {API_KEY_ENV}"
        return f"401: {hint} (server: {text})"
    retry = response.headers.get("Retry-After")
    suffix = f" (retry after {retry} s)" if retry and response.status_code in (429, 503) else ""
    return f"{response.status_code}: {text}{suffix}"


def _sent_key(response: httpx.Response) -> bool:
    try:
        return "authorization" in response.request.headers
    except RuntimeError:  # a response built without its request
        return False


def model_name(client: httpx.Client, wanted: str | None) -> str:
    if wanted:
        return wanted
    response = client.get("/v1/models")
    if response.status_code != 200:
        raise ClientError(f"GET /v1/models: {error_message(response)}")
    names = response.json().get("models") or []
    if len(names) != 1:
        raise ClientError(f"the server serves {names}: name one with --model")
    return str(names[0])


class JobRun:
    """One job followed to its final event: the event stream, the progress bar, cancel on Ctrl-C."""

    def __init__(self, client: httpx.Client, model: str, *, quiet: bool = False) -> None:
        self.client = client
        self.jobs = f"/v1/models/{quote(model, safe='')}/jobs"
        self.quiet = quiet
        self.job_id: str | None = None
        self.bar: tqdm | None = None
        self._text = ""

    def run(self, body: dict[str, Any]) -> dict[str, Any]:
        """Submit and follow the job; the `succeeded` event's result. ClientError for anything else."""
        try:
            final = self._follow(body)
        finally:
            self._close_bar()
        event, data = final
        if event == "succeeded":
            return data
        if event == "failed":
            raise ClientError(f"job {self.job_id} failed: {data.get('error', data)}")
        raise ClientError(f"job {self.job_id} was cancelled on the server")

    def cancel(self) -> str:
        """DELETE the job (after Ctrl-C); a line saying what became of it."""
        self._close_bar()
        if self.job_id is None:
            return "interrupted before the server named the job"
        try:
            response = self.client.delete(f"{self.jobs}/{self.job_id}", timeout=10)
            if response.status_code == 200:
                return f"job {self.job_id} cancelled"
            if response.status_code == 409:
                # Already over: closing the stream may itself have cancelled it (the server stops a
                # streaming job whose client hangs up), or it finished first.
                job = self.client.get(f"{self.jobs}/{self.job_id}", timeout=10)
                if job.status_code == 200:
                    return f"job {self.job_id} {job.json().get('status')}"
            return f"job {self.job_id}: cancel answered {error_message(response)}"
        except httpx.HTTPError as exc:
            return f"job {self.job_id}: cancel failed: {exc}"

    def _follow(self, body: dict[str, Any]) -> tuple[str, Any]:
        final = self._stream("POST", self.jobs, json=body)
        # A stream cut before its final event (a proxy, a dropped connection) does not stop the job:
        # follow it again from its events route.
        for attempt in range(1, RECONNECTS + 1):
            if final is not None or self.job_id is None:
                break
            time.sleep(0.5 * attempt)
            final = self._stream("GET", f"{self.jobs}/{self.job_id}/events")
        if final is None:
            raise ClientError(f"the event stream of job {self.job_id or '(unnamed)'} ended without a result")
        return final

    def _stream(self, method: str, url: str, **kwargs: Any) -> tuple[str, Any] | None:
        try:
            with connect_sse(self.client, method, url, **kwargs) as source:
                if source.response.status_code >= 400:
                    raise ClientError(error_message(source.response))
                for event, data in _events(source.iter_sse()):
                    self._show(event, data)
                    if event in FINAL_EVENTS:
                        return event, data
        except SSEError as exc:
            raise ClientError(f"{method} {url}: not an event stream ({exc})") from exc
        except (httpx.RemoteProtocolError, httpx.ReadTimeout, httpx.ReadError):
            if self.job_id is None:
                raise
        return None

    def _show(self, event: str, data: Any) -> None:
        if event == "status":
            if self.job_id is None and data.get("id"):
                self.job_id = str(data["id"])
                sys.stderr.write(f"job {self.job_id} {data.get('status', '')}\n")
            if data.get("status") == "queued" and data.get("queue_position") is not None:
                ahead = int(data["queue_position"])  # requests ahead of it; 0: next
                self._label(f"queued, {ahead} ahead" if ahead else "queued, next")
        elif event == "progress":
            self._label("generating", total=data.get("steps"))
            bar = self.bar
            if bar is not None:
                bar.update(max(0, int(data.get("step", 0)) - bar.n))

    def _label(self, text: str, total: int | None = None) -> None:
        if self.bar is None:
            self.bar = tqdm(total=total, unit="tok", desc=text, disable=self.quiet, file=sys.stderr,
                            dynamic_ncols=True)
            self._text = text
            return
        if total and self.bar.total != total:
            self.bar.total = total
        if text != self._text:
            self._text = text
            self.bar.set_description(text)

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _events(events: Iterator[Any]) -> Iterator[tuple[str, Any]]:
    for sse in events:
        try:
            data = json.loads(sse.data) if sse.data else {}
        except ValueError:
            continue  # not ours to interpret
        yield sse.event, data


def extension(image: bytes, fallback: str | None) -> str:
    for signature, ext in _SIGNATURES:
        if image.startswith(signature):
            return ext
    return {"jpeg": "jpg"}.get(fallback or "jpeg", fallback or "jpeg")


def save(result: dict[str, Any], out: Path, *, job_id: str | None, fmt: str | None) -> list[Path]:
    """Write the images (best first) and result.json into `out`; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    prediction = result["predictions"][0] if "predictions" in result else result
    written: list[Path] = []
    for rank, b64 in enumerate(prediction.get("images", []), start=1):
        image = base64.b64decode(b64)
        path = out / f"image_{rank:02d}.{extension(image, fmt)}"
        path.write_bytes(image)
        written.append(path)
    summary = {key: value for key, value in prediction.items() if key != "images"}
    summary["files"] = [path.name for path in written]
    summary["job_id"] = job_id
    meta = out / "result.json"
    meta.write_text(json.dumps(summary, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return [*written, meta]


def main(argv: list[str] | None = None) -> int:
    """Run the client; the process exit status."""
    args = build_parser().parse_args(argv)
    timeout = httpx.Timeout(READ_TIMEOUT_S, connect=10.0)
    key = args.api_key or os.environ.get(API_KEY_ENV, "").strip()
    if key and not all("!" <= c <= "~" for c in key):  # what a header carries; never echoed
        sys.stderr.write(f"error: the API key (--api-key or {API_KEY_ENV}) must be printable ASCII "
                         "without spaces\n")
        return EXIT_USAGE
    headers = {"Authorization": f"Bearer {key}"} if key else None
    run: JobRun | None = None
    try:
        with httpx.Client(base_url=args.url.rstrip("/"), timeout=timeout, headers=headers) as client:
            run = JobRun(client, model_name(client, args.model), quiet=args.quiet)
            try:
                result = run.run(request_body(args))
            except KeyboardInterrupt:
                sys.stderr.write(run.cancel() + "\n")
                return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except ClientError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_FAILED
    except httpx.HTTPError as exc:
        sys.stderr.write(f"error: {args.url}: {exc or type(exc).__name__}\n")
        return EXIT_FAILED
    paths = save(result, args.out, job_id=run.job_id, fmt=args.format)
    scores = (result["predictions"][0] if "predictions" in result else result).get("clip_scores", [])
    for i, path in enumerate(paths):
        score = f"\tclip {scores[i]:.4f}" if i < len(scores) else ""
        sys.stdout.write(f"{path}{score}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

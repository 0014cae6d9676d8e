"""Command-line client of the spamlingo server: `spamlingo-predict`.

    echo "Free entry in 2 a wkly comp" | spamlingo-predict   # label<TAB>probability<TAB>lang<TAB>threshold scope
    spamlingo-predict --text "恭喜您中奖了" --text "see you at lunch?" --json
    make predict TEXT="今すぐクリック"

One output line per input line (blank lines included), in order. Lines are sent in requests of
--batch-size texts; a 503 (server busy) is retried after its Retry-After. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Callable, Iterable, Iterator

DEFAULT_URL = "http://127.0.0.1:8000"


class ClientError(Exception):
    """The server could not be reached or refused the request: printed as one line."""


def predict(texts: list[str], url: str = DEFAULT_URL, api_key: str = "", timeout: float = 30.0,
            retries: int = 3) -> list[dict]:
    """POST texts to `url`/v1/classify; returns the server's results (label, spam_probability, threshold,
    threshold_scope, lang, truncated), one per text."""
    body = json.dumps({"texts": texts}, ensure_ascii=False).encode("utf-8")
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    endpoint = url.rstrip("/") + "/v1/classify"
    for attempt in range(retries + 1):
        req = urllib.request.Request(endpoint, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read().decode("utf-8"))["results"]
        except urllib.error.HTTPError as e:
            detail = _error_message(e)
            if e.code == 503 and attempt < retries:
                time.sleep(min(float(e.headers.get("Retry-After") or 1), 30.0))
                continue
            raise ClientError(f"server answered {e.code}: {detail}") from None
        except urllib.error.URLError as e:
            raise ClientError(f"cannot reach the spamlingo server at {url} ({e.reason}); "
                              "is it running? start it with `make serve`") from None
        except (TimeoutError, ConnectionError) as e:
            raise ClientError(f"no answer from the spamlingo server at {url}: {e}") from None
    raise AssertionError("unreachable")


def wait_ready(url: str = DEFAULT_URL, timeout: float = 60.0, alive: Callable[[], bool] | None = None) -> None:
    """Poll `url`/readyz until it answers 200 (bundle loaded, warm-up inference done). Raises ClientError
    after `timeout` seconds, or at once when `alive()` turns false (the server process exited)."""
    endpoint = url.rstrip("/") + "/readyz"
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None and not alive():
            raise ClientError(f"the server at {url} exited before it was ready")
        try:
            with urllib.request.urlopen(endpoint, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:  # refused while it starts, or 503 (an HTTPError) until warm-up is done
            pass
        if time.monotonic() >= deadline:
            raise ClientError(f"the server at {url} was not ready within {timeout:.0f} s")
        time.sleep(0.2)


def _error_message(e: urllib.error.HTTPError) -> str:
    try:
        err = json.loads(e.read().decode("utf-8"))["error"]
        return f"{err['kind']}: {err['message']}"
    except Exception:  # noqa: BLE001 - not one of our error bodies (a proxy, another server)
        return str(e.reason)


def _chunks(lines: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for line in lines:
        chunk.append(line.rstrip("\r\n"))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="spamlingo-predict",
                                description="Classify lines of stdin (or --text) with a running spamlingo server.")
    p.add_argument("--url", default=os.environ.get("SPAMLINGO_URL", DEFAULT_URL),
                   help=f"server URL [env SPAMLINGO_URL; default {DEFAULT_URL}]")
    p.add_argument("--text", action="append", help="a text to classify (repeatable); without it, read stdin")
    p.add_argument("--json", action="store_true", help="print one JSON object per line instead of TSV")
    p.add_argument("--api-key", default=os.environ.get("SPAMLINGO_API_KEY", ""),
                   help="bearer key of a server started with --api-key [env SPAMLINGO_API_KEY]")
    p.add_argument("--batch-size", type=int, default=32, help="texts per request (at most the server's --max-texts)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each answer")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1")

    if args.text:
        lines: Iterable[str] = args.text
    else:
        if sys.stdin.isatty():
            print("reading texts from stdin, one per line (Ctrl-D to end)", file=sys.stderr)
        sys.stdin.reconfigure(encoding="utf-8", errors="replace")  # type: ignore[union-attr]
        lines = sys.stdin
    try:
        for chunk in _chunks(lines, args.batch_size):
            for text, r in zip(chunk, predict(chunk, args.url, args.api_key, args.timeout)):
                if args.json:
                    print(json.dumps({"text": text, **r}, ensure_ascii=False))
                else:
                    # the scope says whose threshold decided the label: "lang:ko" (Korean's own) or "global"
                    print(f"{r['label']}\t{r['spam_probability']:.4f}\t{r['lang']}\t{r.get('threshold_scope', 'global')}")
            sys.stdout.flush()
    except ClientError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()

"""What `spamlingo-serve` takes: its flags, each falling back to the env var SPAMLINGO_<FLAG>, checked before the
server loads anything (serving/server.py starts it). A bad value is a StartupError, printed as one line."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

from serving import explain as X


class StartupError(Exception):
    """A problem that stops the server before it listens: printed as one line."""


@dataclass(frozen=True)
class ServerSettings:
    """Everything `spamlingo-serve` takes; each flag falls back to the env var SPAMLINGO_<FLAG>."""

    bundle: str = ""  # "" = the newest directory under bundles/
    host: str = "127.0.0.1"
    port: int = 8000
    threads: int = 0  # ONNX Runtime intra-op threads (0 = ONNX Runtime's default)
    model: str = ""  # fp32 | int8 ("" = int8 when the bundle has a passed int8 model, else fp32)
    max_batch: int = 32  # texts per ONNX Runtime call
    max_wait_ms: float = 5.0  # how long the oldest waiting text may wait for a batch to fill
    max_texts: int = 64  # texts per request
    max_chars: int = 20_000  # characters per text
    too_long: str = "reject"  # reject (413) | truncate (cut at max_chars, result says truncated)
    max_queue: int = 1024  # texts waiting for the model; beyond it requests get 503
    max_body_bytes: int = 1 << 20
    read_timeout: float = 15.0  # seconds for a request's headers, and again for its body, to arrive
    api_key: str = ""
    feedback_key: str = ""  # opens POST /v1/feedback and nothing else
    admin_key: str = ""  # opens POST /admin/reload and nothing else ("" = reload over HTTP disabled)
    feedback_db: str = ""  # SQLAlchemy URL ("" = sqlite:///<repo>/feedback/feedback.db; "none" = no feedback)
    explain_max_texts: int = 16  # texts per request with "explain": true (more: 413 too_many_texts)
    explain_max_rows: int = X.MAX_ROWS  # extra model rows per explained text (more units: merged spans)
    log_level: str = "info"

    def check(self) -> None:
        """Raise ValueError naming the flag on an impossible value."""
        for name in ("max_batch", "max_texts", "max_chars", "max_queue", "max_body_bytes", "explain_max_texts",
                     "explain_max_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.read_timeout > 0:
            raise ValueError(f"--read-timeout must be more than 0 seconds, got {self.read_timeout}")
        keys = [(n, getattr(self, n)) for n in ("api_key", "feedback_key", "admin_key") if getattr(self, n)]
        for i, (a, ka) in enumerate(keys):
            for b, kb in keys[i + 1:]:
                if ka == kb:  # one key would open what the other is meant to keep closed
                    raise ValueError(f"--{a.replace('_', '-')} and --{b.replace('_', '-')} must differ")
        if self.threads < 0:
            raise ValueError(f"--threads must be 0 (ONNX Runtime's default) or more, got {self.threads}")
        if self.max_wait_ms < 0:
            raise ValueError(f"--max-wait-ms must be 0 or more, got {self.max_wait_ms}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        if self.too_long not in ("reject", "truncate"):
            raise ValueError(f"--too-long must be 'reject' or 'truncate', got {self.too_long!r}")
        if self.log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
            raise ValueError(f"--log-level must be critical|error|warning|info|debug|trace, got {self.log_level!r}")
        if self.model not in ("", "fp32", "int8"):
            raise ValueError(f"--model must be 'fp32' or 'int8', got {self.model!r}")


_FLAGS: dict[str, tuple[type, str, str]] = {
    "bundle": (str, "DIR", "bundle directory (default: the newest under bundles/)"),
    "host": (str, "HOST", "address to bind"),
    "port": (int, "N", "port to bind"),
    "threads": (int, "N", "ONNX Runtime intra-op threads (0 = its default: all cores)"),
    "model": (str, "fp32|int8", "graph to serve (default: int8 when the bundle has a passed int8 model)"),
    "max_batch": (int, "N", "texts per ONNX Runtime call"),
    "max_wait_ms": (float, "MS", "how long the oldest waiting text may wait for its batch to fill"),
    "max_texts": (int, "N", "texts per request (more: 413 too_many_texts)"),
    "max_chars": (int, "N", "characters per text"),
    "too_long": (str, "reject|truncate", "a text over --max-chars: 413 text_too_long, or cut and served"),
    "max_queue": (int, "N", "texts waiting for the model (beside the batch running); beyond: 503 + Retry-After"),
    "max_body_bytes": (int, "N", "request body limit (more: 413 body_too_large)"),
    "read_timeout": (float, "S", "seconds for a request's headers, and then its body, to arrive (more: 408)"),
    "api_key": (str, "KEY", "require `Authorization: Bearer KEY` on /v1/classify, /v1/feedback, "
                            "/v1/feedback/stats and /metrics"),
    "feedback_key": (str, "KEY", "a second key that opens POST /v1/feedback and nothing else (for reporters)"),
    "admin_key": (str, "KEY", "enable POST /admin/reload behind `Authorization: Bearer KEY` (SIGHUP reloads "
                              "either way)"),
    "feedback_db": (str, "URL", "SQLAlchemy URL of the feedback store ('' = sqlite:///<repo>/feedback/feedback.db, "
                                "WAL; 'none' = no feedback endpoints)"),
    "explain_max_texts": (int, "N", 'texts per request with "explain": true (more: 413 too_many_texts)'),
    "explain_max_rows": (int, "N", "extra model rows per explained text: one per removed span (more words: "
                                   "adjacent ones merged)"),
    "log_level": (str, "LEVEL", "critical|error|warning|info|debug (debug adds the access log)|trace"),
}


SECRETS = ("api_key", "feedback_key", "admin_key")


def shown(name: str, value: Any) -> Any:
    """A setting as logs and --help show it: keys hidden, a database URL without its password."""
    if name in SECRETS and value:
        return "***"
    if name == "feedback_db" and value and value != "none":
        from serving.feedback import redact

        return redact(value)
    return value


def parse_settings(argv: list[str] | None = None) -> ServerSettings:
    """Flags, each falling back to SPAMLINGO_<NAME> and then to the ServerSettings default."""
    defaults = ServerSettings()
    p = argparse.ArgumentParser(prog="spamlingo-serve", description="Serve a spamlingo ONNX bundle over HTTP.")
    for name, (tp, metavar, help_) in _FLAGS.items():
        env = f"SPAMLINGO_{name.upper()}"
        default = getattr(defaults, name)
        raw = os.environ.get(env)
        if raw is not None:
            try:
                default = tp(raw)
            except ValueError:
                raise StartupError(f"{env}={raw!r} is not a valid {tp.__name__}") from None
        p.add_argument(f"--{name.replace('_', '-')}", type=tp, default=default, metavar=metavar,
                       help=f"{help_} [env {env}; default {shown(name, default)!r}]")
    settings = ServerSettings(**vars(p.parse_args(argv)))
    try:
        settings.check()
    except ValueError as e:
        raise StartupError(str(e)) from None
    return settings

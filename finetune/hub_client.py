"""Every Hub request finetune makes is bounded in time, and an endpoint found unreachable is not waited on twice.

huggingface_hub 2.x sends its requests through one shared ``httpx2.Client`` built with ``timeout=None``, and
several of its calls (``create_repo``, ``create_branch``, ``repo_info``, the commit POST) also pass
``timeout=None`` per request: against a Hub that accepts the connection but never answers they wait forever.
Its supported hook for this, ``set_client_factory``, lets us build that shared client. Ours is the default
client (huggingface_hub's own request hooks kept: offline mode, request ids) plus one request hook that

- gives every request finite connect, read, write and pool timeouts (``FINETUNE_HUB_TIMEOUT``), and lowers
  the ones huggingface_hub sets itself (10 s for a file's HEAD and GET) when ours are shorter;
- refuses at once, the way ``HF_HUB_OFFLINE`` does, requests to an endpoint that :func:`mark_unreachable`
  named earlier in this process (a pull that fell back to the cache), so that loading the base model and the
  tokenizer afterwards takes them from the cache instead of waiting for a timeout on every file.

Downloads through Xet (``hf_xet``) do not use this client; they have their own timeouts.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from finetune.errors import HubError

logger = logging.getLogger(__name__)

TIMEOUT_ENV = "FINETUNE_HUB_TIMEOUT"
DEFAULT_TIMEOUT = 60.0
"""Seconds a Hub request may wait for the next bytes (reading, writing, a pooled connection)."""
CONNECT_TIMEOUT = 10.0
"""Seconds to open a connection (or ``FINETUNE_HUB_TIMEOUT`` when that is shorter)."""

_installed = False
_unreachable: dict[str, str] = {}
"""Endpoint origin (``scheme://host:port``) -> why it is not asked again in this process."""


@dataclass(frozen=True)
class HubTimeouts:
    connect: float
    read: float
    """Also the write and pool timeouts: the longest wait for any single network operation."""

    def describe(self) -> str:
        """How the user reads and changes them, for error messages."""
        return f"{self.read:g} s ({TIMEOUT_ENV}; connect {self.connect:g} s)"


def hub_timeouts() -> HubTimeouts:
    """The timeouts from ``FINETUNE_HUB_TIMEOUT`` (read at every request, so a change applies at once)."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return HubTimeouts(CONNECT_TIMEOUT, DEFAULT_TIMEOUT)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise HubError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
    return HubTimeouts(min(CONNECT_TIMEOUT, seconds), seconds)


def origin(url: Any) -> str:
    """``scheme://host:port`` of a URL (a string or an ``httpx2.URL``), default ports spelled out."""
    import httpx2

    url = httpx2.URL(str(url))
    port = url.port or {"http": 80, "https": 443}.get(url.scheme, 0)
    return f"{url.scheme}://{url.host}:{port}"


def mark_unreachable(endpoint: str, why: str) -> None:
    """From now on in this process, requests to ``endpoint`` fail at once as in offline mode (the caller works
    from the cache). ``why`` ends up in their error message."""
    _unreachable[origin(endpoint)] = why


def forget_unreachable() -> None:
    """Ask every endpoint again (tests; a long-lived process after the network came back)."""
    _unreachable.clear()


def bound_request(request: Any) -> None:
    """The request hook: refuse an endpoint marked unreachable, then cap every timeout of the request."""
    why = _unreachable.get(origin(request.url))
    if why is not None:
        from huggingface_hub.errors import OfflineModeIsEnabled

        # What huggingface_hub raises in offline mode: its callers fall back to the cache, without retrying.
        raise OfflineModeIsEnabled(f"Cannot reach {request.url}: {why}")
    limits = hub_timeouts()
    asked = request.extensions.get("timeout") or {}
    bounded = {
        "connect": _cap(asked.get("connect"), limits.connect),
        "read": _cap(asked.get("read"), limits.read),
        "write": _cap(asked.get("write"), limits.read),
        "pool": _cap(asked.get("pool"), limits.read),
    }
    request.extensions = {**request.extensions, "timeout": bounded}


def _cap(asked: float | None, limit: float) -> float:
    """``None`` (no limit) becomes ``limit``; a shorter limit already asked for is kept."""
    return limit if asked is None else min(asked, limit)


def use_bounded_client() -> None:
    """Make huggingface_hub's shared client the bounded one (once per process; later calls do nothing).

    The default client is taken as the template, so huggingface_hub's own hooks and redirect policy stay."""
    global _installed
    if _installed:
        return
    import httpx2
    from huggingface_hub import get_session, set_client_factory

    template = get_session()
    request_hooks = [hook for hook in template.event_hooks["request"] if hook is not bound_request]
    response_hooks = list(template.event_hooks["response"])
    follow_redirects = template.follow_redirects

    def bounded_client() -> httpx2.Client:
        limits = hub_timeouts()
        return httpx2.Client(
            event_hooks={"request": [*request_hooks, bound_request], "response": response_hooks},
            follow_redirects=follow_redirects,
            timeout=httpx2.Timeout(limits.read, connect=limits.connect),
        )

    set_client_factory(bounded_client)  # closes the current client; the next request builds ours
    _installed = True

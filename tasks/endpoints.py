"""Before any work: are the MLflow tracking server and the Prefect API there, and do they answer?

MLflow and Prefect both retry a dead or silent server for minutes before they give up with a long traceback.
A plain GET with a short timeout tells the user in seconds, in one line that names the URL and the setting it
came from. Only HTTP(S) endpoints are checked: a SQLite store or Prefect's temporary local server cannot hang
this way.
"""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request

# long enough for a healthy server across a slow network, short enough that a user is not left wondering
CHECK_TIMEOUT_SECONDS = 5.0


class EndpointError(RuntimeError):
    """A server the run needs does not answer; the message is one line naming its URL."""


def _probe(base: str, what: str, setting: str, timeout: float) -> None:
    url = base.rstrip("/") + "/health"
    setting = f"{setting}; GET {url}"
    request = urllib.request.Request(url, headers={"User-Agent": "incompat-preflight"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read(1024)
    except urllib.error.HTTPError:
        return  # it answered: whether it likes this request (auth, path) is for the real client to say
    except (TimeoutError, socket.timeout):
        raise EndpointError(f"{what} at {base} ({setting}) accepted the connection but did not answer within "
                            f"{timeout:g} s") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, (TimeoutError, socket.timeout)):
            raise EndpointError(f"{what} at {base} ({setting}) did not answer within {timeout:g} s") from None
        text = getattr(reason, "strerror", None) or str(reason)
        raise EndpointError(f"cannot reach {what} at {base} ({setting}): {text}") from None
    except (OSError, ValueError) as exc:
        raise EndpointError(f"cannot reach {what} at {base} ({setting}): {exc}") from None


def _is_http(url: str) -> bool:
    return url.lower().startswith(("http://", "https://"))


def check_mlflow(tracking_uri: str, timeout: float = CHECK_TIMEOUT_SECONDS) -> None:
    """MLflow's tracking server answers `/health` (a server behind a path prefix serves it under the prefix)."""
    if _is_http(tracking_uri):
        _probe(tracking_uri, "the MLflow tracking server", "MLFLOW_TRACKING_URI", timeout)


def check_prefect(api_url: str | None, timeout: float = CHECK_TIMEOUT_SECONDS) -> None:
    """Prefect's API answers `{api}/health`; without PREFECT_API_URL the temporary local server is used."""
    if api_url and _is_http(api_url):
        _probe(api_url, "the Prefect API", "PREFECT_API_URL", timeout)


def check_all(tracking_uri: str, timeout: float | None = None) -> None:
    timeout = timeout or float(os.environ.get("INCOMPAT_ENDPOINT_TIMEOUT_SECONDS") or CHECK_TIMEOUT_SECONDS)
    check_prefect(os.environ.get("PREFECT_API_URL"), timeout)
    check_mlflow(tracking_uri, timeout)

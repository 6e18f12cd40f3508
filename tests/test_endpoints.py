"""A tracking server or Prefect API that is not there, or accepts connections and never answers, fails the command
in seconds with one line naming the URL, before any work (MLflow and Prefect alone retry for minutes)."""

import socket
import threading
import time

import pytest

from flows.cli import main
from tasks import endpoints


@pytest.fixture
def closed_port():
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def silent_listener():
    """Accepts connections and never says a word, like a hung server."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted, stop = [], threading.Event()

    def serve():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            accepted.append(conn)  # held open, never answered

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join(2)
    for conn in accepted:
        conn.close()
    server.close()


@pytest.fixture
def dataset(tmp_path):
    from incompat.data import write_dataset
    from tests.conftest import make_imageset

    path = tmp_path / "train.parquet"
    write_dataset(make_imageset(), path)
    return path


def _sanitize(dataset, tmp_path, capsys):
    start = time.monotonic()
    rc = main(["sanitize", str(dataset), "--out", str(tmp_path / "run")])
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    return rc, [line for line in err.splitlines() if line.strip()], elapsed


@pytest.mark.parametrize("which", ["MLFLOW_TRACKING_URI", "PREFECT_API_URL"])
def test_closed_port_fails_in_seconds_naming_the_url(which, closed_port, dataset, tmp_path, capsys, monkeypatch):
    url = f"http://127.0.0.1:{closed_port}" + ("/api" if which == "PREFECT_API_URL" else "")
    monkeypatch.setenv(which, url)
    rc, lines, elapsed = _sanitize(dataset, tmp_path, capsys)
    assert rc == 1
    assert len(lines) == 1, lines
    assert url in lines[0] and which in lines[0] and "Traceback" not in lines[0]
    assert elapsed < 10
    assert not (tmp_path / "run").exists()  # failed before any work


@pytest.mark.parametrize("which", ["MLFLOW_TRACKING_URI", "PREFECT_API_URL"])
def test_a_listener_that_never_answers_fails_in_seconds_naming_the_url(which, silent_listener, dataset, tmp_path,
                                                                       capsys, monkeypatch):
    port, accepted = silent_listener
    url = f"http://127.0.0.1:{port}" + ("/api" if which == "PREFECT_API_URL" else "")
    monkeypatch.setenv(which, url)
    rc, lines, elapsed = _sanitize(dataset, tmp_path, capsys)
    assert rc == 1
    assert len(lines) == 1, lines
    assert url in lines[0] and "did not answer" in lines[0]
    assert accepted, "the check never connected"
    assert elapsed < 10
    assert not (tmp_path / "run").exists()


def test_a_server_that_answers_passes_the_check(monkeypatch):
    """Any HTTP answer (even 404 or 401) means the server is there; the real client judges the rest."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404 if "mlflow" in self.path else 200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        endpoints.check_mlflow(url, timeout=3)
        endpoints.check_mlflow(url + "/mlflow", timeout=3)
        endpoints.check_prefect(url + "/api", timeout=3)
    finally:
        server.shutdown()
        server.server_close()


def test_local_stores_are_not_probed():
    endpoints.check_mlflow("sqlite:///nowhere/mlflow.db", timeout=0.01)
    endpoints.check_prefect(None, timeout=0.01)
    endpoints.check_prefect("", timeout=0.01)

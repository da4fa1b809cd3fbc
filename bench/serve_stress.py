"""`wiremap serve` under bounded hostile load on 127.0.0.1: latencies and error counts.

    python bench/serve_stress.py                     # 16 clients x 200 requests, ~1 min
    python bench/serve_stress.py --clients 8 --requests 50 --features 200

The server runs in its own process (short timeouts: --idle-timeout, --read-deadline) over
a temporary folder holding one synthetic graph (wiremap.attribution.viewer.synthetic). Phase
1: `--clients` threads each send `--requests` mixed requests (list, graph, scores, save,
and requests the server must refuse: a foreign Host, a form post, a cross-origin Origin),
while slowloris clients trickle a byte every 0.5 s, idle clients say nothing, and
`--big` clients announce and stream 50 MB bodies. Phase 2: a flood of idle connections
past the thread limit (answered 503), then the time until a normal request is served
again. Phase 3: `--held` clients each send all but the last byte of a 19 MiB body (just
under the 20 MiB cap) and stall: only as many as fit `--max-body-total` are read, the
others are answered 503 with Retry-After, a small save is served meanwhile, and the
server's peak resident memory is printed (run with `--max-body-total 1e9` to see it without
the budget). Printed: per request kind p50/p95/max latency and unexpected answers, when
each hostile client was cut off, and whether the graph file is still whole. Everything
stops by itself (`--max-seconds`). Timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVER = """
import sys
from wiremap.attribution.viewer.server import make_server
s = make_server(sys.argv[1], "127.0.0.1", 0, timeout=float(sys.argv[2]),
                read_deadline=float(sys.argv[3]), max_threads=int(sys.argv[4]),
                max_body_total=int(float(sys.argv[5])))
print(s.server_address[1], flush=True)
s.serve_forever()
"""


def start_server(folder: Path, args) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-c", SERVER, str(folder), str(args.idle_timeout)]
    cmd += [str(args.read_deadline), str(args.max_threads), str(args.max_body_total)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)
    return proc, int(proc.stdout.readline())


def write_graph_folder(folder: Path, n_features: int) -> list[str]:
    from wiremap.attribution.viewer.synthetic import synthetic_graph, synthetic_graph_json

    obj = synthetic_graph_json(synthetic_graph(n_features=n_features, n_layers=12, n_pos=8))
    path = folder / "g.json"
    path.write_text(json.dumps(obj))
    path.chmod(0o644)
    kinds = ("embedding", "logit", "mlp reconstruction error")
    return [n["node_id"] for n in obj["nodes"] if n["feature_type"] not in kinds]


# ---- the mixed requests -------------------------------------------------------------------
def kinds_of_requests(feats: list[str]):
    """name -> (method, path, body, headers, the status the server must answer)."""
    js = {"Content-Type": "application/json"}
    pins = {"name": "g.json", "pinnedIds": feats[:20]}
    return {
        "list": ("GET", "/api/list", None, {}, 200),
        "graph": ("GET", "/api/graph?name=g.json", None, {}, 200),
        "scores": ("POST", "/api/scores", pins, js, 200),
        "save": (
            "POST",
            "/api/save",
            {"name": "g.json", "qParams": {"pinnedIds": feats[:20]}},
            js,
            200,
        ),
        "foreign host": ("GET", "/api/list", None, {"Host": "evil.example"}, 403),
        "form post": ("POST", "/api/save", {"name": "g.json"}, {"Content-Type": "text/plain"}, 415),
        "cross origin": ("POST", "/api/save", pins, {**js, "Origin": "http://evil.example"}, 403),
        "traversal": ("GET", "/api/graph?name=..%2Fg.json", None, {}, 403),
    }


def one_request(port: int, method, path, body, headers) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def client(port, kinds, n, seed, stats, deadline) -> None:
    rng = random.Random(seed)
    names = list(kinds)
    weights = [4 if k in ("list", "scores") else 1 for k in names]
    for _ in range(n):
        if time.monotonic() > deadline:
            return
        name = rng.choices(names, weights)[0]
        method, path, body, headers, want = kinds[name]
        t0 = time.perf_counter()
        try:
            status = one_request(port, method, path, body, headers)
        except OSError as err:
            status = type(err).__name__
        stats.append((name, time.perf_counter() - t0, status == want, status))


# ---- hostile clients ----------------------------------------------------------------------
def slowloris(port, cut: list, deadline) -> None:
    """Trickle a never-ending header; record how long until the server closes it."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"GET /api/list HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        while time.monotonic() < deadline:
            try:
                sock.sendall(b"X")
                time.sleep(0.5)
            except OSError:
                break
        cut.append(time.perf_counter() - t0)


def idle(port, cut: list, deadline) -> None:
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        try:
            sock.recv(1)
        except OSError:
            pass
        cut.append(time.perf_counter() - t0)


def big_body(port, size: int, out: list) -> None:
    """Announce and stream a `size`-byte body; the server must answer 413 without reading it."""
    t0 = time.perf_counter()
    head = (
        "POST /api/save HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {size}\r\n\r\n"
    ).encode()
    chunk, sent = b" " * 2**20, 0
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        try:
            sock.sendall(head)
            while sent < size:
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass  # the server answered and closed before the body was all sent
        try:
            answer = sock.recv(200)
        except OSError:
            answer = b""
    status = answer.split(b" ")[1].decode() if answer.startswith(b"HTTP/") else "closed"
    out.append((status, sent, time.perf_counter() - t0))


def held_body(port, size: int, out: list) -> None:
    """Send all but the last byte of a `size`-byte body, stopping early if answered."""
    head = (
        "POST /api/save HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {size}\r\n\r\n"
    ).encode()
    chunk, sent, t0 = b" " * 2**20, 0, time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
        sock.sendall(head)
        while sent < size - 1 and not select.select([sock], [], [], 0)[0]:
            try:
                sent += sock.send(chunk[: size - 1 - sent])
            except TimeoutError:
                continue  # the server is not reading (yet): check for an answer
            except OSError:
                break
        sock.settimeout(60)
        try:
            answer = sock.recv(4096)
        except OSError:
            answer = b""
    status = answer.split(b" ")[1].decode() if answer.startswith(b"HTTP/") else "closed"
    out.append((status, b"Retry-After" in answer, sent, time.perf_counter() - t0))


def resident_mib(pid: int) -> float:
    """Resident memory of process `pid` (Linux /proc), MiB; NaN elsewhere."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return float("nan")
    line = next((ln for ln in text.splitlines() if ln.startswith("VmRSS:")), "VmRSS: nan kB")
    return float(line.split()[1]) / 1024


# ---- phases -------------------------------------------------------------------------------
def phase_load(port, feats, args) -> dict:
    deadline = time.monotonic() + args.max_seconds
    stats, cut_slow, cut_idle, bigs = [], [], [], []
    kinds = kinds_of_requests(feats)
    hostile = [threading.Thread(target=slowloris, args=(port, cut_slow, deadline))]
    hostile += [threading.Thread(target=idle, args=(port, cut_idle, deadline))]
    hostile += [
        threading.Thread(target=big_body, args=(port, 50 * 2**20, bigs)) for _ in range(args.big)
    ]
    for _ in range(args.slow - 1):
        hostile.append(threading.Thread(target=slowloris, args=(port, cut_slow, deadline)))
    clients = [
        threading.Thread(target=client, args=(port, kinds, args.requests, i, stats, deadline))
        for i in range(args.clients)
    ]
    t0 = time.perf_counter()
    for t in hostile + clients:
        t.daemon = True
        t.start()
    for t in clients:
        t.join()
    wall = time.perf_counter() - t0
    for t in hostile:
        t.join(max(0.0, deadline - time.monotonic()))
    return dict(stats=stats, slow=cut_slow, idle=cut_idle, big=bigs, wall=wall)


def phase_flood(port, args) -> dict:
    """Hold more idle connections than the server has threads; time until it serves again."""
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(args.flood)]
    time.sleep(0.5)  # well within the idle timeout: all are held now
    refused = 0
    try:
        refused = one_request(port, "GET", "/api/list", None, {}) == 503
    except OSError:
        pass
    t0 = time.perf_counter()
    served = None
    while time.perf_counter() - t0 < args.max_seconds:
        try:
            if one_request(port, "GET", "/api/list", None, {}) == 200:
                served = time.perf_counter() - t0
                break
        except OSError:
            pass
        time.sleep(0.1)
    for s in socks:
        s.close()
    return dict(refused=refused, recovered=served)


def phase_held(port, pid: int, feats, args) -> dict:
    """`--held` stalled 19 MiB bodies at once; the server's peak memory meanwhile."""
    answers, peak, done = [], [resident_mib(pid)], threading.Event()
    before = peak[0]

    def sample() -> None:
        while not done.wait(0.05):
            peak.append(resident_mib(pid))

    threads = [
        threading.Thread(target=held_body, args=(port, 19 * 2**20, answers), daemon=True)
        for _ in range(args.held)
    ]
    threading.Thread(target=sample, daemon=True).start()
    for t in threads:
        t.start()
    time.sleep(1.0)  # the bodies that fit are being read now
    save = kinds_of_requests(feats)["save"]
    small = one_request(port, *save[:4])
    for t in threads:
        t.join(args.max_seconds)
    done.set()
    return dict(answers=answers, before=before, peak=max(peak), small=small)


# ---- report -------------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def held_report(held: dict, args) -> str:
    answers = held["answers"]
    refused = [a for a in answers if a[0] == "503"]
    statuses = ",".join(sorted({a[0] for a in answers}))
    return (
        f"{args.held} stalled 19 MiB bodies (budget {args.max_body_total / 2**20:.0f} MiB): "
        f"{len(answers) - len(refused)} read, {len(refused)} answered 503 "
        f"({sum(a[1] for a in refused)} with Retry-After) [answers {statuses}]; a small save "
        f"meanwhile: {held['small']}; server memory {held['before']:.0f} -> peak "
        f"{held['peak']:.0f} MiB"
    )


def report(load: dict, flood: dict, held: dict, folder: Path, args) -> None:
    stats = load["stats"]
    print(f"{len(stats)} requests from {args.clients} clients in {load['wall']:.1f} s")
    print(f"{'kind':<14}{'n':>6}{'bad':>6}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}  answers")
    for name in sorted({s[0] for s in stats}):
        rows = [s for s in stats if s[0] == name]
        lat = [s[1] * 1000 for s in rows]
        bad = sum(not s[2] for s in rows)
        answers = sorted({str(s[3]) for s in rows})
        print(
            f"{name:<14}{len(rows):>6}{bad:>6}{pct(lat, 0.5):>9.1f}{pct(lat, 0.95):>9.1f}"
            f"{max(lat):>9.1f}  {','.join(answers)}"
        )
    everything = [s[1] * 1000 for s in stats]
    bad = sum(not s[2] for s in stats)
    print(
        f"{'all':<14}{len(stats):>6}{bad:>6}{pct(everything, 0.5):>9.1f}"
        f"{pct(everything, 0.95):>9.1f}{max(everything):>9.1f}"
    )
    cuts = ", ".join(f"{t:.1f}" for t in sorted(load["slow"]))
    print(f"slowloris clients cut off after (s): {cuts or 'never'}")
    print(f"idle clients cut off after (s): {', '.join(f'{t:.1f}' for t in load['idle'])}")
    for status, sent, t in load["big"]:
        print(f"50 MB body: answered {status} after {sent / 2**20:.0f} MiB sent, {t:.2f} s")
    print(
        f"flood of {args.flood} idle connections (limit {args.max_threads} threads): "
        f"extra request answered 503: {bool(flood['refused'])}; served again after "
        f"{flood['recovered']:.1f} s"
        if flood["recovered"] is not None
        else f"flood: never served again within {args.max_seconds} s"
    )
    print(held_report(held, args))
    path = folder / "g.json"
    json.loads(path.read_text())  # raises if a save left the graph broken
    leftovers = sorted(p.name for p in folder.iterdir() if p.name != "g.json")
    print(f"graph file: valid JSON, mode {path.stat().st_mode & 0o777:o}, stray files {leftovers}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=200, help="requests per client")
    p.add_argument("--slow", type=int, default=4, help="slowloris clients")
    p.add_argument("--big", type=int, default=3, help="clients sending 50 MB bodies")
    p.add_argument("--flood", type=int, default=100, help="idle connections in phase 2")
    p.add_argument("--features", type=int, default=300, help="features in the graph")
    p.add_argument("--idle-timeout", type=float, default=2.0)
    p.add_argument("--read-deadline", type=float, default=5.0)
    p.add_argument("--max-threads", type=int, default=64)
    p.add_argument("--held", type=int, default=8, help="stalled 19 MiB bodies in phase 3")
    p.add_argument(
        "--max-body-total", type=float, default=64 * 2**20, help="body bytes held at once"
    )
    p.add_argument("--max-seconds", type=float, default=120.0, help="stop each phase after")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        feats = write_graph_folder(folder, args.features)
        size = (folder / "g.json").stat().st_size
        print(f"graph: {len(feats)} features, {size / 2**20:.1f} MiB")
        proc, port = start_server(folder, args)
        try:
            load = phase_load(port, feats, args)
            flood = phase_flood(port, args)
            held = phase_held(port, proc.pid, feats, args)
        finally:
            proc.terminate()
            proc.wait(10)
        report(load, flood, held, folder, args)


if __name__ == "__main__":
    main()

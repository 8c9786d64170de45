"""Server overhead: what ``conclave serve`` adds over calling the same upstream directly.

One run, measured with ``wrk`` against two paths to the same fast upstream:

* **direct**: ``wrk`` -> nginx, which answers ``/v1/chat/completions`` with a fixed
  OpenAI chat completion (with ``usage``) from memory;
* **conclave**: ``wrk`` -> ``conclave serve`` (one worker) -> the same nginx, with
  accounting on as shipped: SQLite ledger, SQLite budget store, a global budget
  high enough never to refuse (so every call really reserves and settles), an
  API key as Bearer, and a priced cloud-like model whose provider points at nginx.

Figures: P50/P95 at one connection and at a paced 200 requests/s (both paths, and
the difference: the added latency), the maximum throughput through Conclave
(a small sweep of connection counts, errors reported), the ratio to the LiteLLM
reference measured on this box (119-138 rps; 130 used), whether the issue's goals
hold, and a ledger check: after a SIGTERM (which drains the ledger) the ledger holds
one record per request the server answered, no fewer.

The script installs nothing: it needs ``nginx`` and ``wrk`` on PATH
(``scripts/setup --bench`` or ``apt-get install -y nginx-light wrk``).

    python bench/server_overhead.py [--duration 20] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _common import CHAT_COMPLETION, ROOT, free_port

#: LiteLLM 1.100.5 proxy on this box, one worker, nginx upstream, wrk: 119-138 rps
LITELLM_RPS = 130.0
GOAL_THROUGHPUT_RATIO = 5.0
GOAL_ADDED_MS = 1.0

MODEL = "bench/cloud-model"
REQUEST = {"model": MODEL, "max_tokens": 16,
           "messages": [{"role": "user", "content": "What is the capital of France?"}]}
UPSTREAM_KEY = "sk-bench-upstream"

# One Lua state per wrk thread.  request() is defined (not just wrk.body) so each thread
# counts the requests it *sent*: those cut at the deadline are sent but never answered,
# and the server still serves and records them.  delay() paces each thread to a fixed
# schedule (absolute, so truncation to whole ms does not drift the rate) using
# CLOCK_MONOTONIC through LuaJIT's ffi; the threads' schedules are offset from each
# other so the aggregate arrives evenly (4 threads at 50/s: one request every 5 ms).
_LUA = r"""
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } conclave_timespec;
int clock_gettime(int clk, conclave_timespec *tp);
]]
local ts = ffi.new("conclave_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts)
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local threads = {}
function setup(thread)
  table.insert(threads, thread)
  thread:set("phase", #threads - 1)
end

function init(args)
  sent = 0
  local body = os.getenv("BENCH_BODY")
  local headers = {["Content-Type"] = "application/json",
                   ["Authorization"] = "Bearer " .. os.getenv("BENCH_BEARER")}
  req = wrk.format("POST", nil, headers, body)
  interval = tonumber(args[1] or "0")
  -- threads start staggered, so together they send at an even pace, not in bursts
  offset = phase * interval / tonumber(args[2] or "1")
  next_at = nil
end

function request()
  sent = sent + 1
  return req
end

if tonumber(os.getenv("BENCH_INTERVAL_MS") or "0") > 0 then
  function delay()
    local now = now_ms()
    if next_at == nil then next_at = now + offset end
    if next_at < now - interval then next_at = now end
    local d = next_at - now
    next_at = next_at + interval
    if d < 0 then d = 0 end
    return math.floor(d)
  end
end

function done(summary, latency, requests)
  local total_sent = 0
  for _, t in ipairs(threads) do total_sent = total_sent + t:get("sent") end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"sent":%d,"duration_us":%d,"status_errors":%d,' ..
    '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeouts":%d,' ..
    '"p50_us":%d,"p95_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, total_sent, summary.duration, e.status, e.connect, e.read, e.write,
    e.timeout, latency:percentile(50), latency:percentile(95), latency:percentile(99),
    latency.mean, latency.max))
end
"""

_NGINX_CONF = """
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
}}
"""


class BenchError(RuntimeError):
    pass


def check_tools() -> None:
    missing = [t for t in ("nginx", "wrk") if shutil.which(t) is None]
    if missing:
        sys.stderr.write(
            f"error: this benchmark needs {' and '.join(missing)} on PATH.\n"
            "  install them with: scripts/setup --bench\n"
            "  or, on Debian/Ubuntu: apt-get install -y nginx-light wrk\n"
        )
        sys.exit(2)


def _wait_http(url: str, proc: subprocess.Popen[Any], what: str, timeout_s: float = 30.0
               ) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with code {proc.returncode} while starting")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status < 500:
                    return
        except OSError:
            time.sleep(0.1)
    raise BenchError(f"{what} did not answer {url} within {timeout_s:.0f} s")


def _stop(proc: subprocess.Popen[Any], timeout_s: float = 30.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            raise BenchError(f"process {proc.pid} ignored SIGTERM for {timeout_s:.0f} s"
                             ) from None
    return proc.returncode


@contextlib.contextmanager
def nginx(tmp: Path) -> Iterator[str]:
    """nginx with its own config, pid file and logs under ``tmp``, in the foreground."""
    port = free_port()
    body = json.dumps(CHAT_COMPLETION, separators=(",", ":"))
    assert "'" not in body and "$" not in body  # would need escaping in nginx's return
    conf = tmp / "nginx.conf"
    conf.write_text(_NGINX_CONF.format(tmp=tmp, port=port, body=body))
    log = (tmp / "nginx.out").open("wb")
    proc = subprocess.Popen(["nginx", "-p", str(tmp), "-e", str(tmp / "nginx-error.log"),
                             "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{url}/v1/chat/completions", proc, "nginx")
        yield url
    finally:
        _stop(proc)
        log.close()


class Conclave:
    """A ``conclave serve`` child in a fresh data dir, with a key, a budget and a catalog."""

    def __init__(self, tmp: Path, upstream: str) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        catalog = tmp / "catalog.yaml"
        catalog.write_text(
            "providers:\n"
            "  benchcloud:\n    type: openai\n"
            f"    base_url: {upstream}/v1\n    api_key_env: BENCH_UPSTREAM_KEY\n"
            "models:\n"
            f"  - name: {MODEL}\n    provider: benchcloud\n    id: bench-model\n"
            "    tier: 2\n    price: {input: 2.5, output: 10}\n"
        )
        (tmp / "config.yaml").write_text("{}\n")
        # Only what this run sets: a CONCLAVE_* variable from the caller's shell (a
        # PostgreSQL ledger, a Redis budget store) would measure something else.
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONCLAVE_")}
        env.update({
            "CONCLAVE_DATA_DIR": str(tmp / "data"),
            "CONCLAVE_CACHE_DIR": str(tmp / "cache"),
            "CONCLAVE_CONFIG": str(tmp / "config.yaml"),
            "CONCLAVE_CATALOG_FILE": str(catalog),
            "BENCH_UPSTREAM_KEY": UPSTREAM_KEY,
        })
        self.env = env
        self.exe = str(Path(sys.executable).with_name("conclave"))
        if not Path(self.exe).exists():
            self.exe = shutil.which("conclave") or "conclave"
        self.key = ""
        self.proc: subprocess.Popen[Any] | None = None
        self.exit_code: int | None = None

    def cli(self, *args: str) -> Any:
        r = subprocess.run([self.exe, *args, "--json"], env=self.env, capture_output=True,
                           text=True, timeout=120)
        if r.returncode != 0:
            raise BenchError(f"conclave {' '.join(args)} failed: {r.stderr.strip()}")
        return json.loads(r.stdout)

    def setup(self) -> None:
        self.key = self.cli("keys", "create", "--name", "bench")["key"]
        self.cli("budget", "set", "--scope", "global", "--period", "monthly",
                 "--limit", "1000000", "--name", "bench-global")

    def start(self) -> None:
        log = (self.tmp / "conclave.log").open("wb")
        self.proc = subprocess.Popen(
            [self.exe, "serve", "--port", str(self.port), "--workers", "1"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT)
        _wait_http(f"{self.url}/healthz", self.proc, "conclave serve")

    def stop(self) -> int:
        if self.proc is None:
            return 0
        self.exit_code = _stop(self.proc)
        return self.exit_code

    def scrape(self) -> str:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as r:
            return r.read().decode()

    def idle_scrape(self, timeout_s: float = 30.0) -> str:
        """/metrics once no request but the scrape itself is in flight: wrk stops at its
        deadline with requests still being served, and those count too."""
        deadline = time.monotonic() + timeout_s
        while True:
            text = self.scrape()
            if metric(text, "conclave_http_requests_in_flight") <= 1:
                return text
            if time.monotonic() > deadline:
                raise BenchError("conclave serve still has requests in flight after wrk ended")
            time.sleep(0.2)


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(
                f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its threads, from /proc (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def call_once(url: str, bearer: str) -> dict[str, Any]:
    req = urllib.request.Request(
        f"{url}/v1/chat/completions", data=json.dumps(REQUEST).encode(), method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {bearer}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


class Wrk:
    def __init__(self, tmp: Path) -> None:
        self.script = tmp / "bench.lua"
        self.script.write_text(_LUA)
        self.runs: list[dict[str, Any]] = []

    def run(self, url: str, bearer: str, *, threads: int, connections: int, duration_s: float,
            interval_ms: float = 0.0, label: str = "") -> dict[str, Any]:
        env = {**os.environ, "BENCH_BODY": json.dumps(REQUEST), "BENCH_BEARER": bearer,
               "BENCH_INTERVAL_MS": str(interval_ms)}
        cmd = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration_s:g}s",
               "--timeout", "5s", "-s", str(self.script), f"{url}/v1/chat/completions"]
        if interval_ms:
            cmd += ["--", str(interval_ms), str(threads)]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True,
                           timeout=duration_s + 60)
        m = re.search(r"^WRKJSON (.*)$", r.stdout, re.M)
        if r.returncode != 0 or m is None:
            raise BenchError(f"wrk failed ({r.returncode}): {r.stderr.strip() or r.stdout}")
        res: dict[str, Any] = json.loads(m.group(1))
        secs = res["duration_us"] / 1e6
        res.update({
            "label": label, "url": url, "threads": threads, "connections": connections,
            "rps": res["requests"] / secs if secs else 0.0,
            "ok": res["requests"] - res["status_errors"],
            "socket_errors": res["connect_errors"] + res["read_errors"] + res["write_errors"]
            + res["timeouts"],
            "p50_ms": res["p50_us"] / 1000, "p95_ms": res["p95_us"] / 1000,
            "p99_ms": res["p99_us"] / 1000,
            "command": " ".join(cmd),
        })
        self.runs.append(res)
        return res


def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="conclave-bench-"))
    wrk = Wrk(tmp)
    out: dict[str, Any] = {"tmp_dir": str(tmp), "cpus": os.cpu_count(),
                           "loadavg_before": os.getloadavg()[0]}
    with nginx(tmp) as upstream:
        conclave = Conclave(tmp, upstream)
        conclave.setup()
        conclave.start()
        try:
            answer = call_once(conclave.url, conclave.key)
            if answer["choices"][0]["message"]["content"] != "Paris.":
                raise BenchError(f"unexpected answer through Conclave: {answer}")
            direct = call_once(upstream, UPSTREAM_KEY)
            assert direct["usage"]["total_tokens"] == 14
            sent_through = 1  # the check above

            assert conclave.proc is not None
            pid = conclave.proc.pid

            def through(**kw: Any) -> dict[str, Any]:
                nonlocal sent_through
                cpu0 = cpu_seconds(pid)
                res = wrk.run(conclave.url, conclave.key, **kw)
                # CPU the server spent per answered request: less sensitive than requests/s
                # to whatever else runs on the machine
                res["server_cpu_ms_per_request"] = (
                    (cpu_seconds(pid) - cpu0) * 1000 / res["requests"] if res["requests"]
                    else float("nan"))
                sent_through += res["sent"]
                return res

            # warm up both paths (connection pools, caches, code paths)
            wrk.run(upstream, UPSTREAM_KEY, threads=1, connections=1, duration_s=args.warmup,
                    label="warmup direct")
            through(threads=2, connections=8, duration_s=args.warmup, label="warmup conclave")

            d = args.duration
            one = {
                "direct": wrk.run(upstream, UPSTREAM_KEY, threads=1, connections=1,
                                  duration_s=d, label="1 connection direct"),
                "conclave": through(threads=1, connections=1, duration_s=d,
                                    label="1 connection conclave"),
            }
            # 4 connections on 4 threads, each paced to rate/4: a fixed aggregate rate
            interval = 4 * 1000.0 / args.rate
            paced = {
                "direct": wrk.run(upstream, UPSTREAM_KEY, threads=4, connections=4,
                                  duration_s=d, interval_ms=interval,
                                  label=f"{args.rate:g} rps direct"),
                "conclave": through(threads=4, connections=4, duration_s=d,
                                    interval_ms=interval, label=f"{args.rate:g} rps conclave"),
            }
            sweep = [through(threads=2, connections=c, duration_s=args.max_duration,
                             label=f"max conclave -c{c}") for c in args.sweep]
            scraped = conclave.idle_scrape()
            served_200 = metric(scraped, "conclave_http_requests_total",
                                route="/v1/chat/completions", status="200")
            served_all = metric(scraped, "conclave_http_requests_total",
                                route="/v1/chat/completions")
        finally:
            code = conclave.stop()
        # uvicorn re-raises the SIGTERM it handled once shutdown is complete: -15 is clean.
        if code not in (0, -signal.SIGTERM):
            raise BenchError(f"conclave serve exited with {code} on SIGTERM")
        spend = conclave.cli("spend", "--by", "model")
    ok_through = 1 + sum(r["ok"] for r in wrk.runs if r["url"] == conclave.url)
    best = max(sweep, key=lambda r: r["rps"])
    added_1 = {q: one["conclave"][f"{q}_ms"] - one["direct"][f"{q}_ms"] for q in ("p50", "p95")}
    added_r = {q: paced["conclave"][f"{q}_ms"] - paced["direct"][f"{q}_ms"]
               for q in ("p50", "p95")}
    ledger = int(spend["total_calls"])
    errors = sum(r["status_errors"] + r["socket_errors"] for r in wrk.runs
                 if r["url"] == conclave.url)
    out.update({
        "one_connection": {**{k: _brief(v) for k, v in one.items()},
                           "added_p50_ms": added_1["p50"], "added_p95_ms": added_1["p95"]},
        "paced": {**{k: _brief(v) for k, v in paced.items()}, "target_rps": args.rate,
                  "added_p50_ms": added_r["p50"], "added_p95_ms": added_r["p95"]},
        "max_throughput": {"sweep": [_brief(r) for r in sweep], "best_rps": best["rps"],
                           "best_connections": best["connections"],
                           "errors": sum(r["status_errors"] + r["socket_errors"]
                                         for r in sweep)},
        "litellm_reference_rps": LITELLM_RPS,
        "throughput_ratio_vs_litellm": best["rps"] / LITELLM_RPS,
        "ledger": {"total_calls": ledger, "answered_ok_by_wrk": ok_through,
                   "sent_by_wrk": sent_through, "server_200": int(served_200),
                   "server_responses": int(served_all),
                   "total_usd": spend["total_usd"],
                   # wrk stops at its deadline with requests in flight: those the server had
                   # read are served and recorded but never counted by wrk (those it had not
                   # read die with the connection's reset), so the ledger lies between the two
                   # wrk counts, and must equal exactly what the server answered.
                   "exact": ledger == int(served_all) and ok_through <= ledger <= sent_through},
        "errors_through_conclave": errors,
        "loadavg_after": os.getloadavg()[0],
        "goals": {
            "throughput_ge_5x_litellm": best["rps"] >= GOAL_THROUGHPUT_RATIO * LITELLM_RPS,
            "added_p50_lt_1ms_one_connection": added_1["p50"] < GOAL_ADDED_MS,
        },
        "commands": [r["command"] for r in wrk.runs],
        "conclave_serve": f"conclave serve --port {conclave.port} --workers 1 "
                          "(env: CONCLAVE_DATA_DIR, CONCLAVE_CATALOG_FILE; see tmp_dir)",
    })
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _brief(r: dict[str, Any]) -> dict[str, Any]:
    keys = ("label", "threads", "connections", "requests", "sent", "rps", "ok", "status_errors",
            "socket_errors", "p50_ms", "p95_ms", "p99_ms", "server_cpu_ms_per_request")
    return {k: r[k] for k in keys if k in r}


def print_report(res: dict[str, Any]) -> None:
    one, paced, mx, led = (res["one_connection"], res["paced"], res["max_throughput"],
                           res["ledger"])

    def row(name: str, r: dict[str, Any]) -> str:
        return (f"  {name:<10} P50 {r['p50_ms']:7.3f} ms  P95 {r['p95_ms']:7.3f} ms  "
                f"P99 {r['p99_ms']:7.3f} ms  {r['rps']:8.1f} rps  "
                f"errors {r['status_errors'] + r['socket_errors']}")

    print("1 connection (closed loop):")
    print(row("direct", one["direct"]))
    print(row("conclave", one["conclave"]))
    print(f"  added      P50 {one['added_p50_ms']:7.3f} ms  P95 {one['added_p95_ms']:7.3f} ms")
    print(f"paced at {paced['target_rps']:g} requests/s (4 connections, each at 1/4 of it, "
          "staggered):")
    print(row("direct", paced["direct"]))
    print(row("conclave", paced["conclave"]))
    print(f"  added      P50 {paced['added_p50_ms']:7.3f} ms  "
          f"P95 {paced['added_p95_ms']:7.3f} ms")
    print("maximum throughput through conclave (one worker, wrk -t2):")
    for r in mx["sweep"]:
        print(f"  -c{r['connections']:<4} {r['rps']:8.1f} rps  P50 {r['p50_ms']:7.3f} ms  "
              f"P95 {r['p95_ms']:7.3f} ms  non-2xx {r['status_errors']}  "
              f"socket errors {r['socket_errors']}  "
              f"server CPU {r['server_cpu_ms_per_request']:.2f} ms/request")
    print(f"  best {mx['best_rps']:.1f} rps = {res['throughput_ratio_vs_litellm']:.2f}x the "
          f"LiteLLM reference ({res['litellm_reference_rps']:g} rps)")
    print(f"ledger: {led['total_calls']} records; server answered {led['server_responses']} "
          f"({led['server_200']} with 200); wrk got {led['answered_ok_by_wrk']} answers of "
          f"{led['sent_by_wrk']} sent -> {'exact' if led['exact'] else 'MISMATCH'}")
    g = res["goals"]
    print(f"goal >= {GOAL_THROUGHPUT_RATIO:g}x LiteLLM ({GOAL_THROUGHPUT_RATIO * LITELLM_RPS:g} "
          f"rps): {'met' if g['throughput_ge_5x_litellm'] else 'NOT met'}")
    print(f"goal < {GOAL_ADDED_MS:g} ms added P50 at 1 connection: "
          f"{'met' if g['added_p50_lt_1ms_one_connection'] else 'NOT met'}")
    print(f"errors through conclave (all runs): {res['errors_through_conclave']}")
    print(f"machine: {res['cpus']} CPUs, load average {res['loadavg_before']:.2f} before, "
          f"{res['loadavg_after']:.2f} after (other work on the box skews every figure)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=20.0,
                    help="seconds per latency run (1 connection, paced), per path")
    ap.add_argument("--rate", type=float, default=200.0, help="paced requests per second")
    ap.add_argument("--max-duration", type=float, default=10.0,
                    help="seconds per step of the throughput sweep")
    ap.add_argument("--sweep", type=lambda s: [int(x) for x in s.split(",")],
                    default=[8, 16, 32, 64], help="connection counts for the throughput sweep")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, ledger)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    check_tools()
    os.chdir(ROOT)
    try:
        res = run(args)
    except BenchError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(1)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print_report(res)
    if not res["ledger"]["exact"] or res["errors_through_conclave"]:
        sys.exit(1)


if __name__ == "__main__":
    main()

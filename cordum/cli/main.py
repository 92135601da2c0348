"""cordumctl: the operator's command line for a Cordum gateway.

`cordumctl [global options] COMMAND ...` talks to the gateway's REST API (`cordum.cli.http`) and, for
`job watch` / `job submit --wait`, its WebSocket event stream (`cordum.cli.ws`); `workflow` and
`run` live in `cordum.cli.workflows`. Human output is
aligned tables (`cordum.cli.render`); `--json` prints the gateway's JSON. `cordumctl up` runs the
local control plane (`cordum.dev.stack`); `cordumctl dev` acts on its replicas (`cordum.dev.control`).
Exit codes: `cordum.cli.http.EXIT_CODES_HELP`.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, TextIO

import cordum
from cordum.cli import render
from cordum.cli.http import (
    DEFAULT_ADDR,
    DEFAULT_TENANT,
    DEFAULT_TIMEOUT,
    EXIT_APPROVAL,
    EXIT_AUTH,
    EXIT_CODES_HELP,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_RATE_LIMITED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    Client,
    GatewayError,
)
from cordum.cli.ws import StreamError, WebSocketClient, stream_url

ENV_HELP = """\
environment:
  CORDUM_GATEWAY_ADDR, CORDUM_API_URL  gateway address (default http://localhost:8081)
  CORDUM_API_KEY                       API key (sent as X-API-Key; prefer it to --api-key)
  CORDUM_TENANT_ID                     tenant (sent as X-Tenant-ID; default "default")
  CORDUM_CACERT                        CA bundle for an https gateway (like --cacert)
"""

SUB_EPILOG = ("global options (--addr, --api-key, --tenant, --json, --timeout, --cacert, --insecure) go before or after "
              "the command.\n\n" + EXIT_CODES_HELP)

PRIORITIES = ("interactive", "batch", "critical")


# -- output ------------------------------------------------------------------------------------


class Output:
    """stdout/stderr writers that never show the API key."""

    def __init__(self, stdout: TextIO, stderr: TextIO, secret: str = "") -> None:
        self.stdout = stdout
        self.stderr = stderr
        self.secret = secret

    def redact(self, text: str) -> str:
        if self.secret and len(self.secret) >= 4:
            text = text.replace(self.secret, "***")
        return text

    def out(self, text: str = "", *, end: str = "\n") -> None:
        self.stdout.write(self.redact(text) + end)
        self.stdout.flush()

    def err(self, text: str) -> None:
        self.stderr.write(self.redact(text) + "\n")
        self.stderr.flush()

    def isatty(self) -> bool:
        try:
            return self.stdout.isatty()
        except (AttributeError, ValueError):
            return False

    def columns(self) -> int | None:
        """The terminal's width, when output goes to one (tables are fitted to it); else None."""
        return shutil.get_terminal_size().columns if self.isatty() else None

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.out(render.table(headers, rows, fit=self.columns()))


@dataclass
class Ctx:
    args: argparse.Namespace
    client: Client
    io: Output
    json: bool

    def emit_json(self, value: Any) -> None:
        self.io.out(render.to_json(value))

    def usage(self, message: str) -> int:
        self.io.err(f"cordumctl: error: {message}")
        return EXIT_USAGE


# -- argument parsing --------------------------------------------------------------------------


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key.strip(), value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return value


def _add_globals(parser: argparse.ArgumentParser, *, top: bool, skip: Sequence[str] = ()) -> None:
    """Global options, accepted before or after the command (a sub-parser only overrides when given)."""
    kw: dict[str, Any] = {} if top else {"default": argparse.SUPPRESS}
    group = parser.add_argument_group("global options") if top else parser
    group.add_argument("--addr", "--gateway", dest="addr", metavar="URL", **kw,
                       help="gateway address (env CORDUM_GATEWAY_ADDR or CORDUM_API_URL; "
                       f"default {DEFAULT_ADDR})" if top else argparse.SUPPRESS)
    group.add_argument("--api-key", dest="api_key", metavar="KEY", **kw,
                       help="API key (env CORDUM_API_KEY)" if top else argparse.SUPPRESS)
    if "--tenant" not in skip:
        group.add_argument("--tenant", dest="tenant", metavar="ID", **kw,
                           help=f"tenant (env CORDUM_TENANT_ID; default {DEFAULT_TENANT})"
                           if top else argparse.SUPPRESS)
    group.add_argument("--json", dest="json", action="store_true", **kw,
                       help="print the gateway's JSON instead of tables" if top else argparse.SUPPRESS)
    group.add_argument("--timeout", dest="timeout", type=_seconds, metavar="SECONDS", **kw,
                       help=f"per-request timeout (default {DEFAULT_TIMEOUT:g})"
                       if top else argparse.SUPPRESS)
    group.add_argument("--cacert", dest="cacert", metavar="FILE", **kw,
                       help="CA bundle to check an https gateway's certificate with (env CORDUM_CACERT; "
                       "default: the system's CAs)" if top else argparse.SUPPRESS)
    group.add_argument("--insecure", dest="insecure", action="store_true", **kw,
                       help="do not check an https gateway's certificate (testing only)"
                       if top else argparse.SUPPRESS)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cordumctl",
        description="Cordum control plane command line.",
        epilog=EXIT_CODES_HELP + "\n" + ENV_HELP,
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"cordumctl {cordum.__version__}")
    _add_globals(parser, top=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def sub(group: Any, name: str, help: str, *, skip: Sequence[str] = (),
            func: Callable[[Ctx], int] | None = None) -> argparse.ArgumentParser:
        p = group.add_parser(name, help=help, description=help, epilog=SUB_EPILOG,
                             formatter_class=_Formatter)
        _add_globals(p, top=False, skip=skip)
        if func is not None:
            p.set_defaults(func=func)
        return p

    commands.add_parser("version", help="print the version")
    p = commands.add_parser("completion", help="print a shell completion script: "
                            "source <(cordumctl completion bash)")
    p.add_argument("shell", choices=("bash", "zsh"))
    commands.add_parser("up", help="run the control plane locally, N replicas of each service "
                        "(options: cordumctl up --help)", add_help=False)
    commands.add_parser("dev", help="act on the replicas of a local topology: ps, stop, start, kill, "
                        "pause, resume, down (cordumctl dev --help)", add_help=False)
    sub(commands, "status", "gateway, NATS, Redis, workers and pipeline status", func=cmd_status)

    job = sub(commands, "job", "submit, inspect, watch and cancel jobs")
    jobs = job.add_subparsers(dest="job_command", metavar="SUBCOMMAND", required=True)
    p = sub(jobs, "submit", "submit a job", func=cmd_job_submit)
    p.add_argument("--topic", default="job.default", help="job topic (default %(default)s)")
    p.add_argument("--prompt", help="the job's prompt")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input", metavar="JSON", help="job input as JSON (sent as the context; "
                     "its \"prompt\" field, or the JSON text, is the prompt if --prompt is not given)")
    src.add_argument("--input-file", metavar="FILE", help="like --input, read from FILE (- = stdin)")
    p.add_argument("--idempotency-key", metavar="KEY")
    p.add_argument("--label", action="append", type=_label, default=[], metavar="KEY=VALUE",
                   help="a label (repeatable)")
    p.add_argument("--priority", choices=PRIORITIES)
    p.add_argument("--capability")
    p.add_argument("--risk-tag", action="append", default=[], metavar="TAG", help="repeatable")
    p.add_argument("--pack-id")
    _add_watch_options(p)
    p.add_argument("--wait", action="store_true",
                   help="watch the job until it ends; the exit code is the job's outcome")

    p = sub(jobs, "get", "show a job (exit code: its state)", func=cmd_job_get)
    p.add_argument("job_id", metavar="ID")
    p.add_argument("--include-quarantined", action="store_true",
                   help="(admins) show the output even if the output policy quarantined it")
    p = sub(jobs, "list", "list recent jobs", func=cmd_job_list)
    p.add_argument("--state")
    p.add_argument("--topic")
    p.add_argument("--limit", type=_positive_int, default=50)
    p.add_argument("--cursor", help="the next_cursor of the previous page")
    p = sub(jobs, "cancel", "cancel a job", func=cmd_job_cancel)
    p.add_argument("job_id", metavar="ID")
    p = sub(jobs, "trace", "a job's path: its state changes and policy decisions in time order",
            func=cmd_job_trace)
    p.add_argument("job_id", metavar="ID")
    p = sub(jobs, "watch", "follow a job with a progress bar until it ends", func=cmd_job_watch)
    p.add_argument("job_id", metavar="ID")
    _add_watch_options(p)

    from cordum.cli import workflows  # imports this module: registered here, not at import time

    workflows.add_commands(commands, sub)

    approval = sub(commands, "approval", "jobs held for approval")
    approvals = approval.add_subparsers(dest="approval_command", metavar="SUBCOMMAND", required=True)
    p = sub(approvals, "list", "list approval requests", func=cmd_approval_list)
    p.add_argument("--limit", type=_positive_int)
    p.add_argument("--cursor")
    p.add_argument("--all", dest="include_resolved", action="store_true", help="include resolved ones")
    p = sub(approvals, "approve", "approve a held job", func=cmd_approval_approve)
    p.add_argument("job_id", metavar="ID")
    p.add_argument("--reason")
    p.add_argument("--note")
    p = sub(approvals, "reject", "reject a held job", func=cmd_approval_reject)
    p.add_argument("job_id", metavar="ID")
    p.add_argument("--reason")

    dlq = sub(commands, "dlq", "the dead-letter queue")
    dlqs = dlq.add_subparsers(dest="dlq_command", metavar="SUBCOMMAND", required=True)
    p = sub(dlqs, "list", "list dead-lettered jobs", func=cmd_dlq_list)
    p.add_argument("--limit", type=_positive_int)
    p = sub(dlqs, "retry", "resubmit a dead-lettered job (prints the new job id)", func=cmd_dlq_retry)
    p.add_argument("job_id", metavar="ID")
    p = sub(dlqs, "delete", "delete a DLQ entry", func=cmd_dlq_delete)
    p.add_argument("job_id", metavar="ID")

    sub(commands, "workers", "list workers", func=cmd_workers)

    policy = sub(commands, "policy", "the safety policy")
    policies = policy.add_subparsers(dest="policy_command", metavar="SUBCOMMAND", required=True)
    p = sub(policies, "evaluate", "evaluate the policy for a request (exit code: as a submit would get: "
            "0 allow, 4 deny, 5 throttle, 7 approval required)", skip=("--tenant",),
            func=cmd_policy_evaluate)
    p.add_argument("--topic", required=True)
    p.add_argument("--tenant", dest="eval_tenant", metavar="ID",
                   help="tenant to evaluate for (default: the global --tenant)")
    p.add_argument("--label", action="append", type=_label, default=[], metavar="KEY=VALUE")
    p.add_argument("--capability")
    p.add_argument("--risk-tag", action="append", default=[], metavar="TAG")
    p.add_argument("--priority", choices=PRIORITIES)
    return parser


def _add_watch_options(p: argparse.ArgumentParser, what: str = "job") -> None:
    p.add_argument("--interval", type=_seconds, default=1.0, metavar="SECONDS",
                   help=f"how often the {what} is polled while watching (default %(default)s)")
    p.add_argument("--max-wait", type=_seconds, default=0.0, metavar="SECONDS",
                   help="give up watching after this long, exit 1 (default 0: no limit)")


def resolve(args: argparse.Namespace, env: Mapping[str, str]) -> tuple[str, str, str, float]:
    """(addr, api_key, tenant, timeout) from the options, then the environment, then defaults."""
    addr = (getattr(args, "addr", None) or env.get("CORDUM_GATEWAY_ADDR") or env.get("CORDUM_API_URL")
            or env.get("CORDUM_GATEWAY") or DEFAULT_ADDR)
    api_key = getattr(args, "api_key", None) or env.get("CORDUM_API_KEY") or ""
    tenant = getattr(args, "tenant", None) or env.get("CORDUM_TENANT_ID") or DEFAULT_TENANT
    timeout = getattr(args, "timeout", None)
    return addr, api_key, tenant, DEFAULT_TIMEOUT if timeout is None else timeout


def main(argv: Sequence[str] | None = None, *, env: Mapping[str, str] | None = None,
         stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    env = os.environ if env is None else env
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    if argv[:1] == ["up"]:
        from cordum.dev import stack

        return stack.main(argv[1:], prog="cordumctl up", default_workers=2)
    if argv[:1] == ["dev"]:
        from cordum.dev import control

        return control.main(argv[1:], prog="cordumctl dev")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 0 for --help/--version, 2 for usage errors
        return int(exc.code or 0) if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(stderr)
        return EXIT_USAGE
    if args.command == "version":
        stdout.write(f"cordumctl {cordum.__version__}\n")
        return EXIT_OK
    if args.command == "completion":
        from cordum.cli import completion

        from cordum.dev import control

        grafts = {"dev": control.build_parser("cordumctl dev")}  # it parses its own arguments
        stdout.write(completion.script(args.shell, completion.command_tree(parser, grafts)))
        return EXIT_OK
    addr, api_key, tenant, timeout = resolve(args, env)
    io = Output(stdout, stderr, secret=api_key)
    client = Client(addr, api_key=api_key, tenant=tenant, timeout=timeout,
                    cacert=getattr(args, "cacert", None) or env.get("CORDUM_CACERT") or "",
                    insecure=bool(getattr(args, "insecure", False)))
    ctx = Ctx(args, client, io, bool(getattr(args, "json", False)))
    try:
        return args.func(ctx)
    except GatewayError as exc:
        return report_error(ctx, exc)
    except KeyboardInterrupt:
        io.err("cordumctl: interrupted")
        return 130
    finally:
        client.close()


def report_error(ctx: Ctx, exc: GatewayError, prefix: str = "") -> int:
    ctx.io.err(f"cordumctl: {prefix}{exc.describe()}")
    if ctx.json and isinstance(exc.body, dict):
        ctx.emit_json(exc.body)
    return exc.exit_code


# -- commands ----------------------------------------------------------------------------------


def _path(*parts: str) -> str:
    return "/api/v1/" + "/".join(urllib.parse.quote(p, safe="") for p in parts)


def cmd_status(ctx: Ctx) -> int:
    body = ctx.client.get("/api/v1/status") or {}
    nats = body.get("nats") or {}
    redis = body.get("redis") or {}
    healthy = nats.get("connected") is True and redis.get("ok") is True
    if ctx.json:
        ctx.emit_json(body)
    else:
        build = body.get("build") or {}
        pairs: list[tuple[str, Any]] = [
            ("gateway", ctx.client.addr),
            ("version", build.get("version")),
            ("instance", body.get("instance_id")),
            ("uptime", f"{body['uptime_seconds']}s" if "uptime_seconds" in body else None),
            ("nats", _health(nats.get("connected"), nats.get("status"), nats.get("url"))),
            ("redis", _health(redis.get("ok"), redis.get("status"), redis.get("error"))),
            ("workers", (body.get("workers") or {}).get("count", 0)),
            ("rate limiter", (body.get("rate_limiter") or {}).get("mode")),
        ]
        pipeline = body.get("pipeline") or {}
        if pipeline:
            pairs.append(("pipeline", " ".join(f"{k}={v}" for k, v in pipeline.items())))
        ctx.io.out(render.key_values(pairs))
        replicas = body.get("replicas") or {}
        if isinstance(replicas, dict) and replicas:
            rows = [(service, r.get("id"), r.get("version"), render.timestamp(r.get("started_at")))
                    for service, items in sorted(replicas.items()) for r in (items or [])]
            ctx.io.out()
            ctx.io.table(("SERVICE", "REPLICA", "VERSION", "STARTED"), rows)
    if not healthy:
        down = [n for n, ok in (("NATS", nats.get("connected") is True),
                                ("Redis", redis.get("ok") is True)) if not ok]
        ctx.io.err(f"cordumctl: control plane unhealthy: {' and '.join(down)} not ready")
        return EXIT_UNAVAILABLE
    return EXIT_OK


def _health(ok: Any, status: Any, detail: Any) -> str:
    text = "ok" if ok is True else "DOWN"
    extra = [str(x) for x in (status, detail) if x]
    return f"{text} ({', '.join(extra)})" if extra else text


def state_exit(state: str) -> int:
    """Exit code for a job's state: 0 succeeded or in progress, 7 held for approval, 1 otherwise ended."""
    if state == "SUCCEEDED":
        return EXIT_OK
    if state == "APPROVAL_REQUIRED":
        return EXIT_APPROVAL
    if state in render.TERMINAL_STATES:
        return EXIT_FAILED
    return EXIT_OK


def _read_input(ctx: Ctx) -> tuple[bool, Any]:
    args = ctx.args
    if args.input is not None:
        text, where = args.input, "--input"
    elif args.input_file is not None:
        where = args.input_file
        try:
            if args.input_file == "-":
                text = sys.stdin.read()
            else:
                with open(args.input_file, encoding="utf-8") as fh:
                    text = fh.read()
        except OSError as exc:
            raise ValueError(f"cannot read {where}: {exc.strerror or exc}") from None
    else:
        return False, None
    try:
        return True, json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{where} is not valid JSON: {exc}") from None


def submit_body(ctx: Ctx) -> dict[str, Any]:
    """The POST /api/v1/jobs body from the options (ValueError for bad input)."""
    args = ctx.args
    has_input, value = _read_input(ctx)
    prompt = args.prompt
    if prompt is None and has_input:
        if isinstance(value, dict) and isinstance(value.get("prompt"), str):
            prompt = value["prompt"]
        else:
            prompt = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    if not prompt:
        raise ValueError("give --prompt, --input or --input-file")
    body: dict[str, Any] = {"prompt": prompt, "topic": args.topic}
    if has_input:
        body["context"] = value
    if args.priority:
        body["priority"] = args.priority
    if args.idempotency_key:
        body["idempotency_key"] = args.idempotency_key
    if args.label:
        body["labels"] = dict(args.label)
    if args.capability:
        body["capability"] = args.capability
    if args.risk_tag:
        body["risk_tags"] = list(args.risk_tag)
    if args.pack_id:
        body["pack_id"] = args.pack_id
    return body


def cmd_job_submit(ctx: Ctx) -> int:
    try:
        body = submit_body(ctx)
    except ValueError as exc:
        return ctx.usage(str(exc))
    stream = open_stream(ctx) if ctx.args.wait else None  # before submitting: no replay
    try:
        try:
            reply = ctx.client.post("/api/v1/jobs", body) or {}
        except GatewayError as exc:
            if exc.status == 403 and isinstance(exc.body, dict) and exc.body.get("job_id"):
                return report_error(ctx, exc, prefix=f"job {exc.body['job_id']} denied by policy: ")
            return report_error(ctx, exc)
        job_id = str(reply.get("job_id", ""))
        if str(reply.get("status", "")).lower() == "approval_required":
            if ctx.json:
                ctx.emit_json(reply)
            else:
                ctx.io.out(render.key_values([("job_id", job_id), ("status", "APPROVAL_REQUIRED"),
                                              ("reason", reply.get("reason") or "-")]))
            ctx.io.err(f"cordumctl: job {job_id} is held for approval "
                       f"(cordumctl approval approve {job_id})")
            return EXIT_APPROVAL
        if ctx.json:
            ctx.io.out(json.dumps(reply) if ctx.args.wait else render.to_json(reply))
        else:
            ctx.io.out(render.key_values([("job_id", job_id), ("trace_id", reply.get("trace_id"))]))
        if not ctx.args.wait:
            return EXIT_OK
        watcher, stream = Watcher(ctx, job_id, stream), None
        return watcher.run()
    finally:
        if stream is not None:
            stream.close()


def _job_pairs(job: Mapping[str, Any]) -> list[tuple[str, Any]]:
    keys = ("id", "state", "topic", "tenant", "trace_id", "attempts", "priority", "safety_decision",
            "safety_reason", "safety_rule_id", "approval_status", "labels", "result_ptr", "result",
            "error_message", "error_code", "error_status", "last_state", "updated_at")
    pairs: list[tuple[str, Any]] = []
    for key in keys:
        value = job.get(key)
        if value in (None, "", [], {}):
            continue
        if key == "updated_at":
            value = render.timestamp(value)
        elif key in ("state", "safety_decision", "last_state"):
            value = render.short_enum(value)
        pairs.append((key, value))
    return pairs + _output_pairs(job)


def _output_pairs(job: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """What the output policy decided about the job's output, and its findings, one per line."""
    pairs: list[tuple[str, Any]] = []
    if job.get("output_check"):
        pairs.append(("output_check", job["output_check"]))
    if job.get("result_withheld"):
        pairs.append(("result_withheld", job["result_withheld"]))
    safety = job.get("output_safety")
    if isinstance(safety, Mapping) and safety:
        rule = f" (rule {safety['rule_id']})" if safety.get("rule_id") else ""
        pairs.append(("output_policy", f"{safety.get('decision', '')}{rule}: {safety.get('reason', '')}".strip()))
        for finding in safety.get("findings") or []:
            if isinstance(finding, Mapping):
                where = f" at {finding.get('offset', 0)}+{finding.get('length', 0)}" if finding.get("length") else ""
                pairs.append(("finding", f"{finding.get('type', '')} [{finding.get('severity', '')}, "
                                         f"{finding.get('scanner', '')}]{where}: {finding.get('detail', '')}"))
    return pairs


def cmd_job_get(ctx: Ctx) -> int:
    query = {"include_quarantined": "true"} if getattr(ctx.args, "include_quarantined", False) else {}
    job = ctx.client.get(_path("jobs", ctx.args.job_id), **query) or {}
    if ctx.json:
        ctx.emit_json(job)
    else:
        ctx.io.out(render.key_values(_job_pairs(job)))
    return state_exit(render.short_enum(job.get("state")))


def cmd_job_list(ctx: Ctx) -> int:
    a = ctx.args
    body = ctx.client.get("/api/v1/jobs", limit=a.limit, state=a.state, topic=a.topic,
                          cursor=a.cursor) or {}
    return print_page(ctx, body, ("ID", "STATE", "TOPIC", "TENANT", "UPDATED"), lambda j: (
        j.get("id"), render.short_enum(j.get("state")), j.get("topic"), j.get("tenant"),
        render.timestamp(j.get("updated_at"))), "jobs")


def print_page(ctx: Ctx, body: Any, headers: Sequence[str], row: Callable[[dict[str, Any]], Sequence[Any]],
               what: str) -> int:
    """A list answer (a JSON array, or a page `{items, next_cursor}`): its JSON with --json, else a
    table of `row(item)` and, when there is a next page, its cursor on stderr."""
    if ctx.json:
        ctx.emit_json(body)
        return EXIT_OK
    items = body.get("items") if isinstance(body, dict) else body
    _print_rows(ctx, headers, [row(item) for item in items or [] if isinstance(item, dict)], what)
    if isinstance(body, dict) and body.get("next_cursor"):
        ctx.io.err(f"more: --cursor {body['next_cursor']}")
    return EXIT_OK


def _print_rows(ctx: Ctx, headers: Sequence[str], rows: list[Sequence[Any]], what: str) -> None:
    if rows:
        ctx.io.table(headers, rows)
    else:
        ctx.io.err(f"no {what}")


def cmd_job_cancel(ctx: Ctx) -> int:
    body = ctx.client.post(_path("jobs", ctx.args.job_id, "cancel")) or {}
    if ctx.json:
        ctx.emit_json(body)
    else:
        state = render.short_enum(body.get("state")) or "CANCELLED"
        note = f" ({body['reason']})" if body.get("reason") else ""
        ctx.io.out(f"job {body.get('id') or ctx.args.job_id}: {state}{note}")
    return EXIT_OK


def cmd_job_trace(ctx: Ctx) -> int:
    body = ctx.client.get(_path("jobs", ctx.args.job_id, "timeline")) or {}
    if ctx.json:
        ctx.emit_json(body)
        return state_exit(render.short_enum(body.get("state")))
    ctx.io.out(render.key_values([("job", body.get("id")), ("trace_id", body.get("trace_id")),
                                  ("state", render.short_enum(body.get("state")))]))
    rows = []
    for item in body.get("items") or []:
        if item.get("kind") == "decision":
            what = f"policy {render.short_enum(item.get('decision'))}"
            detail = "; ".join(str(x) for x in (item.get("rule_id") and f"rule {item['rule_id']}", item.get("reason"))
                               if x)
        else:
            what, detail = render.short_enum(item.get("state")), item.get("detail")
        rows.append((render.timestamp(item.get("at"), ms=True), what, item.get("by"), detail))
    ctx.io.out()
    _print_rows(ctx, ("AT", "STEP", "BY", "DETAIL"), rows, "recorded steps")
    return state_exit(render.short_enum(body.get("state")))


def cmd_job_watch(ctx: Ctx) -> int:
    return Watcher(ctx, ctx.args.job_id, open_stream(ctx)).run()


# -- watching a job ------------------------------------------------------------------------------


def open_stream(ctx: Ctx) -> WebSocketClient | None:
    """The gateway's event stream, or None (with a note on stderr) when it cannot be opened."""
    headers = {k: v for k, v in ctx.client.headers().items() if k.startswith("X-")}
    try:
        client = WebSocketClient(stream_url(ctx.client.addr), headers=headers, timeout=ctx.client.timeout,
                                 tls=ctx.client.tls())
        client.connect()
    except (StreamError, GatewayError) as exc:
        ctx.io.err(f"cordumctl: progress stream unavailable ({exc}); polling the job instead")
        return None
    return client


def match_packet(packet: Mapping[str, Any], job_id: str) -> tuple[str, dict[str, Any]] | None:
    """("progress", {percent, message}) or ("result", {status}) for this job's packets, else None."""
    for key, kind in (("jobProgress", "progress"), ("job_progress", "progress"),
                      ("jobResult", "result"), ("job_result", "result")):
        inner = packet.get(key)
        if not isinstance(inner, dict):
            continue
        if str(inner.get("jobId", inner.get("job_id", ""))) != job_id:
            return None
        if kind == "progress":
            try:
                percent = float(inner.get("percent") or 0)
            except (TypeError, ValueError):
                percent = 0.0
            return kind, {"percent": percent, "message": str(inner.get("message") or "")}
        return kind, {"status": render.short_enum(inner.get("status"))}
    return None


_END = object()


class Watcher:
    """Follows one job: progress from the stream, the terminal state from polling the job (truth)."""

    MAX_POLL_FAILURES = 5

    def __init__(self, ctx: Ctx, job_id: str, stream: WebSocketClient | None) -> None:
        self.ctx = ctx
        self.job_id = job_id
        self.stream = stream
        self.events: "queue.Queue[Any]" = queue.Queue()
        self.interval = max(0.05, float(getattr(ctx.args, "interval", 1.0) or 1.0))
        self.max_wait = float(getattr(ctx.args, "max_wait", 0.0) or 0.0)
        self.percent: float | None = None
        self.message = ""
        self.state = ""
        self.tty = ctx.io.isatty() and not ctx.json
        self._last_line = ""

    def run(self) -> int:
        reader = None
        if self.stream is not None:
            reader = threading.Thread(target=self._read, name="cordumctl-stream", daemon=True)
            reader.start()
        try:
            return self._loop()
        finally:
            if self.stream is not None:
                self.stream.close()
            if reader is not None:
                reader.join(timeout=1.0)

    def _read(self) -> None:
        assert self.stream is not None
        try:
            for packet in self.stream.packets():
                self.events.put(packet)
        except StreamError:
            pass
        finally:
            self.events.put(_END)

    def _loop(self) -> int:
        started = time.monotonic()
        next_poll = started
        failures = 0
        while True:
            now = time.monotonic()
            if now >= next_poll:
                try:
                    job = self.ctx.client.get(_path("jobs", self.job_id)) or {}
                    failures = 0
                except GatewayError as exc:
                    failures += 1
                    if exc.exit_code != EXIT_UNAVAILABLE or failures >= self.MAX_POLL_FAILURES:
                        self._end_line()
                        raise
                    self.ctx.io.err(f"cordumctl: {exc.describe()} (retrying)")
                    job = None
                next_poll = time.monotonic() + self.interval
                if job is not None:
                    state = render.short_enum(job.get("state"))
                    # SUCCEEDED with its output still under the output policy's check: the check
                    # may yet quarantine it, and the result is not served until it ends
                    checking = state == "SUCCEEDED" and job.get("output_check") in ("due", "pending")
                    if state in render.TERMINAL_STATES and not checking:
                        self._drain()
                        return self._finish(job, state)
                    if state != self.state:
                        self.state = state
                        self._show()
            if self.max_wait and time.monotonic() - started >= self.max_wait:
                self._end_line()
                self.ctx.io.err(f"cordumctl: job {self.job_id} still {self.state or 'not finished'} "
                                f"after {self.max_wait:g}s")
                return EXIT_FAILED
            try:
                item = self.events.get(timeout=max(0.0, next_poll - time.monotonic()))
            except queue.Empty:
                continue
            if self._handle(item):
                next_poll = time.monotonic()  # a result event: confirm with the job record now

    def _handle(self, item: Any) -> bool:
        if item is _END:
            return False
        found = match_packet(item, self.job_id)
        if found is None:
            return False
        kind, info = found
        if self.ctx.json:
            self.ctx.io.out(json.dumps(item, separators=(",", ":")))
        if kind == "progress":
            self.percent, self.message = info["percent"], info["message"]
            self._show()
            return False
        return True

    def _drain(self) -> None:
        while True:
            try:
                item = self.events.get_nowait()
            except queue.Empty:
                return
            self._handle(item)

    def _show(self) -> None:
        if self.ctx.json:
            return
        line = render.progress_bar(self.percent, state=self.state, message=self.message)
        if line == self._last_line:
            return
        self._last_line = line
        if self.tty:
            self.ctx.io.out("\r" + line + "\x1b[K", end="")
        else:
            self.ctx.io.out(line)

    def _end_line(self) -> None:
        if self.tty and self._last_line:
            self.ctx.io.out()
            self._last_line = ""

    def _finish(self, job: Mapping[str, Any], state: str) -> int:
        self.state = state
        if self.ctx.json:
            self.ctx.io.out(json.dumps(job, separators=(",", ":")))
            return state_exit(state)
        if state == "SUCCEEDED":
            self.percent = 100.0
        self._show()
        self._end_line()
        pairs: list[tuple[str, Any]] = [("job", self.job_id), ("state", state)]
        for key in ("result", "result_ptr", "error_message", "error_code", "safety_reason"):
            if job.get(key) not in (None, "", [], {}):
                pairs.append((key, job[key]))
        self.ctx.io.out(render.key_values(pairs + _output_pairs(job)))
        return state_exit(state)


# -- approvals, DLQ, workers, policy -----------------------------------------------------------


def cmd_approval_list(ctx: Ctx) -> int:
    a = ctx.args
    body = ctx.client.get("/api/v1/approvals", limit=a.limit, cursor=a.cursor,
                          include_resolved="true" if a.include_resolved else None) or {}

    def row(item: dict[str, Any]) -> tuple[Any, ...]:
        job = item.get("job") or {}
        return (job.get("id") or item.get("job_id"), job.get("topic"), render.short_enum(job.get("state")),
                item.get("approval_status"), render.short_enum(item.get("decision")),
                item.get("policy_reason") or item.get("decision_summary"))

    return print_page(ctx, body, ("JOB_ID", "TOPIC", "STATE", "APPROVAL", "DECISION", "REASON"), row,
                      "approval requests")


def cmd_approval_approve(ctx: Ctx) -> int:
    a = ctx.args
    payload = {k: v for k, v in (("reason", a.reason), ("note", a.note)) if v is not None}
    body = ctx.client.post(_path("approvals", a.job_id, "approve"), payload) or {}
    if ctx.json:
        ctx.emit_json(body)
    else:
        status = body.get("status") or "approved"
        trace = f" (trace {body['trace_id']})" if body.get("trace_id") else ""
        ctx.io.out(f"job {body.get('job_id') or a.job_id}: {status}{trace}")
    return EXIT_OK


def cmd_approval_reject(ctx: Ctx) -> int:
    a = ctx.args
    payload = {"reason": a.reason} if a.reason is not None else {}
    body = ctx.client.post(_path("approvals", a.job_id, "reject"), payload) or {}
    if ctx.json:
        ctx.emit_json(body)
    else:
        ctx.io.out(f"job {body.get('job_id') or a.job_id}: rejected")
    return EXIT_OK


def cmd_dlq_list(ctx: Ctx) -> int:
    body = ctx.client.get("/api/v1/dlq", limit=ctx.args.limit) or {}
    if ctx.json:
        ctx.emit_json(body)
        return EXIT_OK
    rows = [(e.get("job_id"), e.get("topic"), render.short_enum(e.get("status")), e.get("reason_code"),
             render.short_enum(e.get("last_state")), e.get("attempts"),
             render.timestamp(e.get("created_at")), e.get("reason"))
            for e in body.get("items") or []]
    _print_rows(ctx, ("JOB_ID", "TOPIC", "STATUS", "CODE", "LAST_STATE", "ATTEMPTS", "CREATED",
                      "REASON"), rows, "DLQ entries")
    return EXIT_OK


def cmd_dlq_retry(ctx: Ctx) -> int:
    body = ctx.client.post(_path("dlq", ctx.args.job_id, "retry")) or {}
    if ctx.json:
        ctx.emit_json(body)
    else:
        ctx.io.out(f"job {ctx.args.job_id} resubmitted as {body.get('job_id', '?')}")
    return EXIT_OK


def cmd_dlq_delete(ctx: Ctx) -> int:
    body = ctx.client.delete(_path("dlq", ctx.args.job_id))
    return acknowledge(ctx, body, {"job_id": ctx.args.job_id, "deleted": True},
                       f"DLQ entry {ctx.args.job_id} deleted")


def acknowledge(ctx: Ctx, body: Any, fallback: Mapping[str, Any], message: str) -> int:
    """Report an action the gateway confirms, often with an empty 204: its JSON (or `fallback`)
    with --json, else `message`."""
    if ctx.json:
        ctx.emit_json(body if body is not None else dict(fallback))
    else:
        ctx.io.out(message)
    return EXIT_OK


def cmd_workers(ctx: Ctx) -> int:
    body = ctx.client.get("/api/v1/workers") or {}
    if ctx.json:
        ctx.emit_json(body)
        return EXIT_OK
    items = body.get("items") if isinstance(body, dict) else body
    rows = []
    for w in items or []:
        age = w.get("heartbeat_age_seconds")
        rows.append((w.get("worker_id"), w.get("pool"), w.get("online"),
                     f"{w.get('active_jobs', 0)}/{w.get('max_parallel_jobs', 0)}", w.get("cpu_load"),
                     f"{float(age):.0f}s ago" if isinstance(age, (int, float)) else age,
                     w.get("labels")))
    _print_rows(ctx, ("WORKER", "POOL", "ONLINE", "JOBS", "CPU", "HEARTBEAT", "LABELS"), rows,
                "workers")
    return EXIT_OK


_DECISION_EXIT = {
    "ALLOW": EXIT_OK,
    "ALLOW_WITH_CONSTRAINTS": EXIT_OK,
    "REDACT": EXIT_OK,
    "DENY": EXIT_AUTH,
    "QUARANTINE": EXIT_AUTH,
    "THROTTLE": EXIT_RATE_LIMITED,
    "REQUIRE_HUMAN": EXIT_APPROVAL,
    "REQUIRE_APPROVAL": EXIT_APPROVAL,
}


def cmd_policy_evaluate(ctx: Ctx) -> int:
    a = ctx.args
    payload: dict[str, Any] = {"topic": a.topic, "tenant": a.eval_tenant or ctx.client.tenant}
    if a.label:
        payload["labels"] = dict(a.label)
    if a.capability:
        payload["capability"] = a.capability
    if a.risk_tag:
        payload["risk_tags"] = list(a.risk_tag)
    if a.priority:
        payload["priority"] = a.priority
    body = ctx.client.post("/api/v1/policy/evaluate", payload) or {}
    decision = render.short_enum(body.get("decision")) or "UNSPECIFIED"
    if ctx.json:
        ctx.emit_json(body)
    else:
        ctx.io.out(render.key_values([
            ("decision", decision),
            ("reason", body.get("reason") or "-"),
            ("rule", body.get("ruleId") or body.get("rule_id")),
            ("snapshot", body.get("policySnapshot") or body.get("policy_snapshot")),
            ("constraints", body.get("constraints") or None),
            ("approval", "required" if body.get("approvalRequired") or body.get("approval_required")
             else None),
        ]))
    return _DECISION_EXIT.get(decision, EXIT_FAILED)


if __name__ == "__main__":
    sys.exit(main())

"""`cordumctl completion bash|zsh`: a shell completion script, generated from the argument parser
itself so it never drifts from the commands. It completes command words and options at every level
(`cordumctl job sub<TAB>`, `cordumctl run start --<TAB>`); values are left to the shell's defaults.

    source <(cordumctl completion bash)          # bash, this shell
    cordumctl completion zsh > "${fpath[1]}/_cordumctl"   # zsh (bashcompinit-based)
"""

from __future__ import annotations

import argparse
import shlex

SHELLS = ("bash", "zsh")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse exposes no public walk of its tree
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> list[str]:
    """The options, and the choices of positional arguments (`completion bash|zsh`)."""
    words = {flag for action in parser._actions for flag in action.option_strings}
    for action in parser._actions:
        if not action.option_strings and action.choices and not isinstance(action, argparse._SubParsersAction):
            words.update(str(choice) for choice in action.choices)
    return sorted(words)


def command_tree(parser: argparse.ArgumentParser,
                 grafts: dict[str, argparse.ArgumentParser] | None = None) -> dict[str, list[str]]:
    """{"job submit": [words…]}: the words that may follow each command path ("" is the top).
    `grafts` are commands that parse their own arguments (`dev`), with the parser they use."""
    tree: dict[str, list[str]] = {}

    def walk(path: str, node: argparse.ArgumentParser) -> None:
        children = _subparsers(node)
        tree[path] = sorted(children) + _options(node)
        for name, child in children.items():
            walk(f"{path} {name}".strip(), child)

    walk("", parser)
    for path, graft in (grafts or {}).items():
        walk(path, graft)
    return tree


def script(shell: str, tree: dict[str, list[str]]) -> str:
    if shell not in SHELLS:
        raise ValueError(f"unknown shell {shell!r}: one of {', '.join(SHELLS)}")
    cases = "\n".join(f"        {shlex.quote(path)}) words={shlex.quote(' '.join(words))} ;;"
                      for path, words in sorted(tree.items()))
    known = " ".join(sorted({part for path in tree for part in path.split()}))
    body = f"""_cordumctl() {{
    local cur path w i known={shlex.quote(known)}
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    path=""
    # The command path: the command words typed so far (options and their values skipped).
    for ((i = 1; i < COMP_CWORD; i++)); do
        w="${{COMP_WORDS[i]}}"
        case " $known " in *" $w "*) path="${{path:+$path }}$w" ;; esac
    done
    local words=""
    case "$path" in
{cases}
    esac
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
}}
complete -o default -F _cordumctl cordumctl
"""
    if shell == "zsh":
        return "#compdef cordumctl\nautoload -U +X bashcompinit && bashcompinit\n" + body
    return body

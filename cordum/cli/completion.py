"""`cordumctl completion bash|zsh`: a shell completion script, generated from the argument parser
itself so it never drifts from the commands. It completes command words and options at every level
(`cordumctl job sub<TAB>`, `cordumctl run start --<TAB>`); values are left to the shell's defaults.

    source <(cordumctl completion bash)    # in ~/.bashrc
    source <(cordumctl completion zsh)     # in ~/.zshrc (through zsh's bashcompinit)
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
    paths = "|" + "|".join(sorted(tree)) + "|"  # every command path, "|job|job submit|…|"
    body = f"""_cordumctl() {{
    local cur path next w i paths={shlex.quote(paths)}
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    path=""
    # The command path: each typed word that extends it to a known path (so an option's value
    # that happens to be a command name is skipped).
    for ((i = 1; i < COMP_CWORD; i++)); do
        w="${{COMP_WORDS[i]}}"
        next="${{path:+$path }}$w"
        case "$paths" in *"|$next|"*) path="$next" ;; esac
    done
    local words=""
    case "$path" in
{cases}
    esac
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
}}
complete -o default -F _cordumctl cordumctl
"""
    if shell == "zsh":  # zsh runs the same function through its bash-completion layer
        return "autoload -U +X compinit && compinit\nautoload -U +X bashcompinit && bashcompinit\n" + body
    return body

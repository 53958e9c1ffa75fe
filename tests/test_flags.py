"""Every command's flags: exact names only (no prefix matching), and documented in --help."""

import argparse
import importlib

import pytest

COMMANDS = ["scripts.base_train", "scripts.base_loss", "scripts.base_eval", "scripts.mid_train", "scripts.chat_sft",
            "scripts.chat_rl", "scripts.chat_eval", "scripts.chat_cli", "scripts.chat_web", "scripts.tok_train",
            "scripts.tok_eval", "nanochat.dataset", "nanochat.report"]


def options(parser):
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("module", COMMANDS)
def test_a_prefix_of_a_flag_is_not_taken_for_the_flag(module):
    parser = importlib.import_module(module).parser
    positionals = [a.choices[0] for a in parser._actions if not a.option_strings and a.required]
    for action in options(parser):
        flag = max(action.option_strings, key=len)
        if len(flag) > 4:  # e.g. --dept=4 for --depth: left over (parse_args: "unrecognized arguments")
            _, leftover = parser.parse_known_args(positionals + [f"{flag[:-1]}=1"])
            assert leftover == [f"{flag[:-1]}=1"], flag


@pytest.mark.parametrize("module", COMMANDS)
def test_help_describes_every_flag_and_shows_its_default(module):
    parser = importlib.import_module(module).parser
    text = "".join(parser.format_help().split())  # (help wraps lines, even inside a long path at a hyphen)
    for action in options(parser):
        assert action.help, f"{module} {action.option_strings} has no description"
        if action.default is not None and "default" not in action.help:
            assert "".join(f"(default: {action.default})".split()) in text, (module, action.option_strings)

"""Every command's flags: exact names only (no prefix matching), and documented in --help."""

import argparse
import importlib

import pytest

from conftest import run_module

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


@pytest.mark.parametrize("module, flag, value, message", [
    ("scripts.base_train", "--depth", "0", "expected an integer >= 1, got 0"),
    ("scripts.base_train", "--max_seq_len", "abc", "expected an integer, got 'abc'"),
    ("scripts.base_train", "--total_batch_size", "0", "expected an integer >= 1 or -1, got 0"),
    ("scripts.base_train", "--window", "1.5", "expected a number from 0 to 1, got 1.5"),
    ("scripts.base_train", "--warmdown_ratio", "nan", "expected a number from 0 to 1, got nan"),
    ("scripts.base_train", "--matrix_lr", "-0.02", "expected a number >= 0, got -0.02"),
    ("scripts.mid_train", "--num_iterations", "0", "expected an integer >= 1 or -1, got 0"),
    ("scripts.chat_sft", "--examples_per_step", "-4", "expected an integer >= 1, got -4"),
    ("scripts.chat_rl", "--num_samples", "0", "expected an integer >= 1, got 0"),
    ("scripts.chat_cli", "-t/--temperature", "3", "expected a number from 0 to 2, got 3"),
    ("scripts.chat_eval", "-b/--batch_size", "0", "expected an integer >= 1, got 0"),
    ("scripts.tok_train", "--doc_cap", "0", "expected an integer >= 1, got 0"),
])
def test_a_value_out_of_range_is_a_one_line_error(module, flag, value, message, capsys):
    """Out-of-range numbers stop at parsing, naming the flag: they used to run (--num_iterations=0 a
    whole run, --window=1.5 a full-context one) or crash later (--depth=0: ZeroDivisionError)."""
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).parser.parse_args([f"{flag.split('/')[-1]}={value}"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"error: argument {flag}: {message}")


@pytest.mark.parametrize("module", COMMANDS)
def test_every_checked_default_is_in_range(module):
    """argparse checks only typed values, not defaults: each default must pass its own flag's check,
    and the special values (-1 = the stage's own) parse."""
    for action in options(importlib.import_module(module).parser):
        if action.default is not None and action.type and action.type.__qualname__.startswith(("int_flag", "float_flag")):
            assert action.type(str(action.default)) == action.default, (module, action.option_strings)


def test_the_command_line_gets_the_error_and_nothing_runs(tmp_path):
    r = run_module("scripts.base_train", "--depth=0", env={"NANOCHAT_BASE_DIR": str(tmp_path)})
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith("error: argument --depth: expected an integer >= 1, got 0")
    assert list(tmp_path.iterdir()) == []

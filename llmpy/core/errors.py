"""Errors shared by the layers."""

from __future__ import annotations


class OptionError(ValueError):
    """An option value that cannot be used; `option` is its field name, `value` what was given. The command
    line names the option by its flag (`block_tokens` is `--block-tokens`)."""

    def __init__(self, option: str, value, problem: str):
        self.option, self.value, self.problem = option, value, problem
        super().__init__(f"{option} {value!r} {problem}")

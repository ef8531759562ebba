"""The engines' plugin entry points: installed, they change nothing until asked.

SGLang (entry point group ``sglang.srt.plugins``) and vLLM (``vllm.general_plugins``) run
every installed plugin in every process they start, unless an allowlist
(``SGLANG_PLUGINS`` / ``VLLM_PLUGINS``) names the ones to run. So ours points the engine at
mmassembler only when asked: ``MMASSEMBLER_ENGINES=1`` (or ``true``/``yes``), or our
plugin's name, ``mmassembler``, in the engine's allowlist. Options come from the
environment (see ``engines.sglang.apply`` / ``engines.vllm.apply``). Each entry point is
cheap and idempotent, and touches no device.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("mmassembler")

NAME = "mmassembler"  # our entry point's name in both groups
SWITCH = "MMASSEMBLER_ENGINES"


def enabled(allowlist_variable: str) -> bool:
    """Whether the user asked for mmassembler: the switch, or our name in the engine's
    allowlist (the engine only runs a plugin it names there)."""
    if os.environ.get(SWITCH, "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    names = {x.strip() for x in os.environ.get(allowlist_variable, "").split(",")}
    return NAME in names


def sglang_plugin() -> None:
    """SGLang's general plugin: ``engines.sglang.apply()`` when enabled."""
    if not enabled("SGLANG_PLUGINS"):
        logger.debug("mmassembler's SGLang plugin is installed but off (set %s=1)", SWITCH)
        return
    from mmassembler.engines import sglang

    sglang.apply()


def vllm_plugin() -> None:
    """vLLM's general plugin: ``engines.vllm.apply()`` when enabled."""
    if not enabled("VLLM_PLUGINS"):
        logger.debug("mmassembler's vLLM plugin is installed but off (set %s=1)", SWITCH)
        return
    from mmassembler.engines import vllm

    vllm.apply()

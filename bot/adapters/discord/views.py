"""The Stop, Re-run and Export buttons.

They are ``DynamicItem``s: the job id travels in the button's ``custom_id`` and the class is
registered once with ``Client.add_dynamic_items``, so a button posted by an earlier process (or
another replica) still works after a restart — nothing is kept in memory per message.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Protocol

import discord


class Controls(Protocol):
    """What a button press asks of the adapter (``Intake`` implements it)."""

    async def stop(self, interaction: discord.Interaction[Any], job_id: str) -> None: ...

    async def rerun(self, interaction: discord.Interaction[Any], job_id: str) -> None: ...

    async def export(self, interaction: discord.Interaction[Any], job_id: str) -> None: ...


class HasControls(Protocol):
    controls: Controls


def _controls(interaction: discord.Interaction[Any]) -> Controls:
    client: HasControls = interaction.client  # our client class provides ``controls``
    return client.controls


if TYPE_CHECKING:
    _ButtonItem = discord.ui.DynamicItem[discord.ui.Button[discord.ui.View]]
else:
    _ButtonItem = discord.ui.DynamicItem[discord.ui.Button]


class StopButton(_ButtonItem, template=r"codeloop:stop:(?P<job>[0-9a-f]{32})"):
    def __init__(self, job_id: str) -> None:
        super().__init__(discord.ui.Button(label="Stop", emoji="⏹", style=discord.ButtonStyle.danger,
                                           custom_id=f"codeloop:stop:{job_id}"))
        self.job_id = job_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction[Any], item: discord.ui.Item[Any],
                             match: re.Match[str], /) -> StopButton:
        return cls(match["job"])

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        await _controls(interaction).stop(interaction, self.job_id)


class RerunButton(_ButtonItem, template=r"codeloop:rerun:(?P<job>[0-9a-f]{32})"):
    def __init__(self, job_id: str) -> None:
        super().__init__(discord.ui.Button(label="Re-run", emoji="🔁", style=discord.ButtonStyle.secondary,
                                           custom_id=f"codeloop:rerun:{job_id}"))
        self.job_id = job_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction[Any], item: discord.ui.Item[Any],
                             match: re.Match[str], /) -> RerunButton:
        return cls(match["job"])

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        await _controls(interaction).rerun(interaction, self.job_id)


class ExportButton(_ButtonItem, template=r"codeloop:export:(?P<job>[0-9a-f]{32})"):
    """Attach the thread as a Jupyter notebook (built by the worker from its own record)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(discord.ui.Button(label="Export", emoji="📓", style=discord.ButtonStyle.secondary,
                                           custom_id=f"codeloop:export:{job_id}"))
        self.job_id = job_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction[Any], item: discord.ui.Item[Any],
                             match: re.Match[str], /) -> ExportButton:
        return cls(match["job"])

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        await _controls(interaction).export(interaction, self.job_id)


def running_view(job_id: str) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(StopButton(job_id))
    return view


def finished_view(job_id: str) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(RerunButton(job_id))
    view.add_item(ExportButton(job_id))
    return view

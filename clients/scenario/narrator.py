"""Rich output for the scenario: chapters, narration, tables and a live event tail."""

from __future__ import annotations

import time

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.rule import Rule
from rich.table import Table


class Narrator:
    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self.started = time.monotonic()
        self.chapter_no = 0

    def elapsed(self) -> str:
        return f"{time.monotonic() - self.started:5.1f}s"

    def title(self, text: str, subtitle: str = "") -> None:
        self.console.print(
            Panel.fit(f"[bold]{escape(text)}[/bold]\n{escape(subtitle)}", border_style="cyan")
        )

    def chapter(self, title: str) -> None:
        self.chapter_no += 1
        self.console.print()
        self.console.print(
            Rule(f"[bold cyan]{self.chapter_no}. {escape(title)}[/bold cyan]", align="left")
        )

    def say(self, text: str) -> None:
        self.console.print(f"[dim]{self.elapsed()}[/dim]  {text}")

    def ok(self, text: str) -> None:
        self.console.print(f"[dim]{self.elapsed()}[/dim]  [green]✓[/green] {text}")

    def warn(self, text: str) -> None:
        self.console.print(f"[dim]{self.elapsed()}[/dim]  [yellow]![/yellow] {text}")

    def event(self, source: str, text: str) -> None:
        self.console.print(f"[dim]{self.elapsed()}  │ {escape(source)}: {text}[/dim]")

    def table(self, title: str, columns: list[str], rows: list[list[str]]) -> None:
        table = Table(title=title, title_justify="left")
        for column in columns:
            table.add_column(column)
        for row in rows:
            table.add_row(*row)
        self.console.print(table)

"""The summary screen ``kdstore train`` prints after a run (rich table)."""

from __future__ import annotations

from kdstore.train.objective import describe


def print_summary(recipe, result) -> None:
    """The final table of a :class:`~kdstore.train.recipe.Recipe` run: run size, speed, last evaluation."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"kdstore train: {recipe.out_dir}")
    table.add_column("")
    table.add_column("value", justify="right")
    rows = [("objective", describe(recipe.cfg.loss)), ("student", recipe.cfg.model.arch), ("ranks × workers",
            f"{recipe.world_size} × {max(1, recipe.cfg.data.workers)}"), ("device", str(recipe.device)),
            ("steps", f"{result.steps:,}"), ("epochs", f"{result.epochs:.2f}"), ("train time", f"{result.seconds:.1f} s"),
            ("samples/s, whole run with evals", f"{result.samples_per_s:,.0f}")]
    for key, value in result.eval.items():
        rows.append((f"eval {key}", f"{value:.4f}" if isinstance(value, float) else str(value)))
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)

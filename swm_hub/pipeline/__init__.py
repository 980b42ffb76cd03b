"""The recipes that join stages, one module per command that needs more than one stage.

``compress`` pulls, merges, then heals, evaluates, exports, writes the card and pushes as asked; ``heal``
hands the heal stage the card writer and the drop-baseline comparison (merge and evaluate stages); ``push``
hands the push stage the card renderer. A recipe imports only the stages it runs, so ``push`` loads no
torch. Commands of a single stage (eval, export, bench, card) call that stage directly from the CLI.
"""

"""Entry point from the CLI into the workbench."""

from __future__ import annotations


def launch(args) -> int:
    from .app import HeadSurgeonApp

    app = HeadSurgeonApp(model_ref=args.model, device=args.device, dtype=args.dtype,
                         prompts_path=getattr(args, "prompts", None), attach=getattr(args, "run", None))
    app.run()
    return app.return_code or 0

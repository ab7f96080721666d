"""`python -m llmpy`: the llmpy command."""

from llmpy.commands.cli import main

raise SystemExit(main())

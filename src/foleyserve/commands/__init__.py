"""The larger CLI commands, one module each (see ``foleyserve.cli._COMMAND_MODULES``)."""

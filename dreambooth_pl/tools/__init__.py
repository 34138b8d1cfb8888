"""Commands that are not Trainer methods (registered in ``dreambooth_pl.__main__.COMMANDS``)."""

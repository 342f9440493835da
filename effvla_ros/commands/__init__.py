"""Subcommands of the ``effvla`` command (see ``effvla_ros.cli``)."""

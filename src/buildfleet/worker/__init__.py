"""The bot (`buildfleet bot`): takes leases from a Bots service and runs them.

- session.py: the Remote Workers API session loop, signals, health reporting;
- runner.py: one lease from Action to ActionResult, the command's process group;
- inputs.py: input tree and command checks, laying the inputs out on disk;
- outputs.py: collecting outputs into ActionResult fields;
- cache.py: the local content-addressed cache of input files (hard links, LRU);
- health.py: is the bot fit to take work;
- config.py / command.py: settings and the command line.
"""

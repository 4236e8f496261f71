"""buildfleet: a remote-execution grid for Remote Execution API v2 clients."""

__version__ = "0.1.0"

"""The fleet's web page (`web: {listen: HOST:PORT}`): overview, bots, queues and
operations, live, over the Admin API."""

from buildfleet.server.web.endpoint import WebEndpoint, ssl_context
from buildfleet.server.web.pages import Pages

__all__ = ["Pages", "WebEndpoint", "ssl_context"]

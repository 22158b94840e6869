"""FastAPI dependencies shared by the routers: the node, a database session,
the task dispatcher and the routing rules.

The application keeps its parts on ``app.state``: ``node`` (always),
``dispatcher`` (given to :func:`pacs_node.api.app.create_app`, or built
lazily on first use from the node's settings).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from pacs_node.jobs.routing import RoutingRule, parse_rules
from pacs_node.node import Node
from pacs_node.queue import Dispatcher

__all__ = [
    "DbSession",
    "DispatcherDep",
    "NodeDep",
    "dispatcher_of",
    "get_db_session",
    "get_dispatcher",
    "get_node",
    "get_rules",
]

logger = logging.getLogger(__name__)

_LOCK = threading.Lock()


def get_node(request: Request) -> Node:
    """The :class:`~pacs_node.node.Node` the application was built around.

    Parameters
    ----------
    request:
        The current request.

    Returns
    -------
    Node
        ``request.app.state.node``.
    """
    node: Node = request.app.state.node
    return node


NodeDep = Annotated[Node, Depends(get_node)]


def get_db_session(node: NodeDep) -> Iterator[Session]:
    """A read session (no transaction block; closed after the response).

    Parameters
    ----------
    node:
        The node.

    Yields
    ------
    Session
        A SQLAlchemy session on the node's database.
    """
    with node.db.sessionmaker() as s:
        yield s


DbSession = Annotated[Session, Depends(get_db_session)]


def dispatcher_of(state: Any) -> Dispatcher:
    """The dispatcher kept on an application's ``state``; a
    :class:`~pacs_node.queue.CeleryDispatcher` on the node's broker is built
    on first use when none was given.

    Parameters
    ----------
    state:
        ``app.state`` (holds ``node`` and maybe ``dispatcher``).

    Returns
    -------
    Dispatcher
        An object with ``enqueue_process`` and ``enqueue_delivery``.
    """
    dispatcher: Dispatcher | None = getattr(state, "dispatcher", None)
    if dispatcher is not None:
        return dispatcher
    with _LOCK:
        dispatcher = getattr(state, "dispatcher", None)
        if dispatcher is None:
            from pacs_node.queue import CeleryDispatcher

            dispatcher = CeleryDispatcher(state.node.settings)
            state.dispatcher = dispatcher
            state.owns_dispatcher = True
            broker = state.node.settings.queue.broker_url.rsplit("@", 1)[-1]  # no credentials in logs
            logger.info("task dispatcher created for broker %s", broker)
    return dispatcher


def get_dispatcher(request: Request) -> Dispatcher:
    """Dependency: the application's dispatcher (see :func:`dispatcher_of`).

    Parameters
    ----------
    request:
        The current request.

    Returns
    -------
    Dispatcher
        The dispatcher.
    """
    return dispatcher_of(request.app.state)


DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]


def get_rules(node: NodeDep) -> list[RoutingRule]:
    """Routing rules from the ``[[routing]]`` tables of the configuration.

    Parameters
    ----------
    node:
        The node.

    Returns
    -------
    list of RoutingRule
        Validated rules (the default rule when none are configured).
    """
    return parse_rules(node.settings.routing)

"""``keiryo agent``: the edge device's crash-safe updater and local inference endpoint (see docs/updates.md)."""

from keiryo.agent.agent import Agent, AgentConfig
from keiryo.agent.state import State

__all__ = ["Agent", "AgentConfig", "State"]

"""The Flower side of the round loop: a :class:`~server.stages.Transport` over a ``Grid``.

One of the few files that import Flower. It turns :class:`~server.rounds.Payload` values
into Flower messages and replies back into :class:`~server.rounds.Reply` values; it
holds no logic of the round. Every reply is attributed to the node its message was sent
to (a reply names the message it answers), never to the sender it claims.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from .rounds import Payload, Reply, ReplyBlock

__all__ = ["GridTransport", "encode_payload"]


class GridTransport:
    """A :class:`~server.stages.Transport` over a Flower ``Grid``."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    @property
    def clients_in_series(self) -> bool:
        """Whether the grid runs the clients one after another (the in-process engine sets
        ``clients_in_series = True``); a deployment's nodes train in parallel."""
        return bool(getattr(self.grid, "clients_in_series", False))

    def node_ids(self) -> list[int]:
        return sorted(int(n) for n in self.grid.get_node_ids())

    def send(
        self, message_type: str, payloads: Mapping[int, Payload], *, timeout: float
    ) -> Sequence[Reply | ReplyBlock]:
        records: dict[int, RecordDict] = {}  # one RecordDict per distinct payload object
        messages = []
        for node_id, payload in payloads.items():
            content = records.get(id(payload))
            if content is None:
                content = records[id(payload)] = encode_payload(payload)
            messages.append(Message(content=content, message_type=message_type,
                                    dst_node_id=node_id))
        # the grid writes each message's id in place when it sends it
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        return [_decode(m, sent_to) for m in replies]


def encode_payload(payload: Payload) -> RecordDict:
    """A payload as the content of a Flower message (one record per named map)."""
    out: dict[str, ArrayRecord | ConfigRecord] = {
        name: ArrayRecord(dict(arrays)) for name, arrays in payload.arrays.items()
    }
    out.update({name: ConfigRecord(dict(cfg)) for name, cfg in payload.configs.items()})
    return RecordDict(out)


def _decode(msg: Message, sent_to: Mapping[str, int]) -> Reply:
    """Never raises on bad content: a malformed reply is the client's fault, not ours.

    A reply counts only if it answers a message sent in this exchange and comes from the
    node that message was sent to; otherwise it is an error reply (attributed to the node
    it claims to come from), which the round rejects with the reason.
    """
    src = int(msg.metadata.src_node_id)
    node = sent_to.get(msg.metadata.reply_to_message_id)
    if node is None:
        return Reply(src, error=(
            f"reply answers no message sent in this round (reply_to "
            f"{str(msg.metadata.reply_to_message_id)[:40]!r}): a late or forged reply"))
    if msg.has_error():
        # Flower reports a lost node with an error reply sent by the SuperLink itself, so
        # an error's sender is not checked
        err = msg.error
        return Reply(node, error=f"client error {err.code}: {err.reason}")
    if src != node:
        return Reply(node, error=(
            f"reply to the message sent to node {node} came from node {src}"))
    content = msg.content
    try:
        arrays = {k: rec.to_torch_state_dict() for k, rec in content.array_records.items()}
    except Exception as exc:  # undecodable payloads
        return Reply(node, error=f"undecodable arrays: {exc}")
    return Reply(
        node,
        arrays=arrays,
        metrics={k: dict(rec) for k, rec in content.metric_records.items()},
        configs={k: dict(rec) for k, rec in content.config_records.items()},
    )

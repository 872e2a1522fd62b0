"""What a pruner must know about a model, declared by the model family as it builds the model.

The metadata is a small dataflow description in module names, never parameter indices:
- an *inner* conv feeds its channels (after its BN and activation) straight into `consumers`
  (convs or a linear classifier), so removing a filter removes their matching input channels;
- a *stream* conv adds its output into a residual stream; a stream's channels are shared by all
  its producers, read by all its consumers, and an option-A shortcut carries a parent stream's
  channel `src` into this stream's channel `dst`.

Traced models (pruning/trace.py) may add three more relations, which the zoo never declares:
- a *follower* has no channels of its own: its channel i is channel i of its `follow` source (a
  depthwise conv, a squeeze-excite excitation, a BatchNorm on a stream or concat), so it is cut
  wherever its source is, and is never scored;
- a *concat* is read like a stream, its channels being its parts' channels one after another;
- a *fixed* conv keeps every output channel (a grouped conv, or a squeeze-excite squeeze), and the
  sources a grouped conv reads are *frozen* (cutting them would need equal cuts per group).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StreamMeta:
    """A residual stream: channels written by several producers (added) and read by consumers."""

    name: str
    width: int
    producers: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    parent: str | None = None  # option-A shortcut source stream
    parent_map: list[tuple[int, int]] = field(default_factory=list)  # (parent channel, channel)


@dataclass
class ConcatMeta:
    """A channel concatenation: `parts` (inner convs, streams or concats) in order, their widths."""

    name: str
    parts: list[str]
    widths: list[int]
    consumers: list[str] = field(default_factory=list)

    @property
    def width(self) -> int:
        return sum(self.widths)


@dataclass
class BlockMeta:
    """One residual block: its convs in order and how its shortcut is made."""

    name: str
    stage: int  # 1-based stage (layerN)
    convs: list[str]
    shortcut: str  # "identity" | "downsample" | "option_a"
    downsample: str | None
    stream_in: str
    stream_out: str


@dataclass
class ModelMeta:
    """Model-level facts (timm-style `first_conv` / `classifier`) plus the pruning dataflow."""

    name: str
    family: str  # "cifar_resnet" | "resnet" | "vgg"
    num_classes: int
    input_size: int
    first_conv: str
    classifier: str
    convs: list[str] = field(default_factory=list)  # forward order
    bn: dict[str, str] = field(default_factory=dict)  # conv -> the BN that follows it
    consumers: dict[str, list[str]] = field(default_factory=dict)  # inner conv -> readers
    stream_of: dict[str, str] = field(default_factory=dict)  # stream conv -> its stream
    streams: dict[str, StreamMeta] = field(default_factory=dict)
    blocks: list[BlockMeta] = field(default_factory=list)
    follow: dict[str, str] = field(default_factory=dict)  # follower module -> its source
    fixed: list[str] = field(default_factory=list)  # convs that keep every output channel
    frozen: list[str] = field(default_factory=list)  # sources no group may narrow
    concats: dict[str, ConcatMeta] = field(default_factory=dict)

    def add_conv(self, conv: str, bn: str) -> None:
        self.convs.append(conv)
        self.bn[conv] = bn

    def add_stream(self, name: str, width: int, **kw) -> StreamMeta:
        self.streams[name] = StreamMeta(name, width, **kw)
        return self.streams[name]

    def produce(self, conv: str, stream: str) -> None:
        self.stream_of[conv] = stream
        self.streams[stream].producers.append(conv)

    def feed(self, source: str, reader: str) -> None:
        """`reader` reads the channels of `source` (an inner conv, a stream or a concat name)."""
        if source in self.streams:
            self.streams[source].consumers.append(reader)
        elif source in self.concats:
            self.concats[source].consumers.append(reader)
        else:
            self.consumers.setdefault(source, []).append(reader)

"""Who hears whom: each leg's sending side hears at most one receiving side (its source),
and a source may be heard by any number of legs.

The bridge keeps both directions of that relation in one place, tells a
listener the codec it now hears (relay, G.711 law table or transcoding), and
tells a source whether it must decode (a listener transcodes or is under a
prompt). Per packet nothing here runs: a leg's fast path holds its source's
`listeners` list, which stays the same object for the source's life.
"""

from __future__ import annotations

from voiceline.audio.receiver import Receiver
from voiceline.audio.sender import Sender


class Bridge:
    def __init__(self) -> None:
        self._sources: dict[Sender, Receiver] = {}
        self._listeners: dict[Receiver, list[Sender]] = {}

    def listeners(self, source: Receiver) -> list[Sender]:
        """Who hears `source`, as a list kept up to date in place."""
        return self._listeners.setdefault(source, [])

    def source(self, listener: Sender) -> Receiver | None:
        return self._sources.get(listener)

    def connect(self, listener: Sender, source: Receiver) -> None:
        """`listener` hears `source` from now on, and nothing else."""
        if self._sources.get(listener) is source:
            return
        self.disconnect(listener)
        self._sources[listener] = source
        listener.hear_source(source.codec)
        self.listeners(source).append(listener)
        self._update(source)

    def disconnect(self, listener: Sender) -> None:
        """`listener` hears no source any more."""
        source = self._sources.pop(listener, None)
        if source is None:
            return
        listener.hear_nothing()
        self._listeners[source].remove(listener)
        self._update(source)

    def listener_changed(self, listener: Sender) -> None:
        """Whether `listener` needs PCM changed (a prompt started or ended)."""
        source = self._sources.get(listener)
        if source is not None:
            self._update(source)

    def remove(self, source: Receiver, listener: Sender) -> None:
        """A leg closes: it hears nothing, and those who heard it hear nothing until told otherwise."""
        self.disconnect(listener)
        listeners = self._listeners.pop(source, [])
        for other in listeners:
            del self._sources[other]
            other.hear_nothing()
        listeners.clear()  # the closing leg's fast path may still hold the list

    def _update(self, source: Receiver) -> None:
        source.want_pcm(any(listener.needs_pcm for listener in self._listeners[source]))

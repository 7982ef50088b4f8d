"""The guest agent, and the one API guest code uses: data channels to the host.

Guest code streams results to the host without going through stdout::

    from ember.agent import channel

    with channel("results") as ch:
        for row in rows:
            ch.send(row)

The host reads them in order with ``ChannelServer.channel("results")``.

Importing this package must stay cheap, because user programs in the guest do
it and each import there costs real time: it loads only the channel code
(``socket``, ``struct``, ``ember.protocol``), never the server. The server is
``python3 -m ember.agent``; the run_code worker is ``python3 -m ember.agent.worker``.
"""

from ember.agent.channels import Channel, channel

__all__ = ["Channel", "channel"]

"""``ember serve``: sandboxes as a service.

A daemon owns sandboxes by id and serves them over HTTP (FastAPI, OpenAPI at
``/openapi.json``).  Its VMMs are forked by a *keeper* (:mod:`.keeper`), a
zygote of the daemon's state directory that outlives the daemon, so a daemon
restart (or ``kill -9``) re-adopts the running sandboxes from the records in
its state directory (:mod:`.state`) instead of losing them.

Only the daemon and its clients import FastAPI and friends (the ``serve``
extra); the VMM, the guest agent and the embedded SDK never do.  This
package's ``__init__`` stays empty of imports so :mod:`.keeper` starts light.
"""

"""The typed data the stages exchange: dimension groups (:mod:`.groups`), the entries a ranking removes
(:mod:`.entries`), per-channel costs (:mod:`.cost`) and the latency model (:mod:`.latency_model`)."""

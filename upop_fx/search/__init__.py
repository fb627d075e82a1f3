"""Selection strategies and what they share: the UPop search (:mod:`.upop`), magnitude (:mod:`.magnitude`),
the strategy interface and allocations (:mod:`.strategy`), the unified ranking (:mod:`.ranking`) and the
training loops over streamed data (:mod:`.train`)."""

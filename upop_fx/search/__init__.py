"""Selection strategies: the UPop search (:mod:`.upop`), magnitude (:mod:`.magnitude`), the strategy interface
and allocations (:mod:`.strategy`) and the unified ranking (:mod:`.ranking`)."""

"""The hit-rate lab (``kvferry bench hitrate``): simulate or replay a request trace against
kvferry's real store. :mod:`.lru_stack` (every LRU capacity in one pass) and :mod:`.direct` (one
tier driven through its eviction policy) are the fast paths the lab picks from.
"""

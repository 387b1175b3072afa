"""Memory: the planner (pure arithmetic over sizes and budgets), the budget read from the device, and the
policy whose mechanisms (fp8 storage, offloading, expert swapping, tiling) carry a plan out.
"""

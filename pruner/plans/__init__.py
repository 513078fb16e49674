"""Plans: the plan type, what `plan` is asked for, sensitivity, the evidence allocators decide from, the allocators
and the plans they make.
"""

"""The Redis backplane: several workers (processes or machines) share rooms.

See [scaling](../topics/scaling.md).
"""

from wsroom._backplane.redis import RedisBackplane

__all__ = ["RedisBackplane"]

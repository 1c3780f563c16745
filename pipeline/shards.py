"""Input shards (WebDataset tars): moved to :mod:`kdstore.store.shards`, re-exported here."""

from kdstore.store.shards import (  # noqa: F401
    LABEL_EXTENSIONS,
    ShardListing,
    expand_urls,
    iter_samples,
    list_shard,
    read_label,
)

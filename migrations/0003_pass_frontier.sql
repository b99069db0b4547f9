-- The frontier of a pass in physical order: the first transaction ID (an
-- epoch-qualified one) not yet assigned when the pass started. Every row the
-- pass rewrites gets a version from that ID on. The pass does not count the
-- rows it meets that are already under the new key and that new: it rewrote
-- them itself before they moved ahead of it. A row written before the pass
-- started has an older version, and counts, even while another transaction
-- that started before it was still running. NULL for a pass that an earlier
-- version started, which goes on with `pass_horizon` in its place.
ALTER TABLE ranges ADD COLUMN pass_frontier bigint;

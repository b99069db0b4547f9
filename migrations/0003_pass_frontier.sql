-- Where a pass in physical order started, to tell the rows it rewrote
-- itself from older ones when it meets them again: the first transaction ID
-- not yet assigned then (`pass_frontier`, epoch-qualified), and the IDs of
-- the transactions running then (`pass_running`). Every row the pass
-- rewrites has a version from the frontier on. A row version from a
-- transaction below the frontier and not among those running was written
-- before the pass started, and counts when the pass reads it. NULL until a
-- pass starts, and for a pass that an earlier version started, which goes
-- on with `pass_horizon` alone.
ALTER TABLE ranges ADD COLUMN pass_frontier bigint;
ALTER TABLE ranges ADD COLUMN pass_running bigint[];

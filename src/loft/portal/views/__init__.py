"""The portal's routes, one module per area; each page and its JSON API under /api side by
side, both guarded by ``loft.portal.auth.require`` with an action from the permission table."""

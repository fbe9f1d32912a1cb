"""Curation and labelling: projects over a dataset version, questions, assignment with overlap,
responses, agreement, the reviewer's final answers and exports to new dataset versions.

No torch, no web imports: the portal (loft.portal.views.labelling) and tests call this API.
"""

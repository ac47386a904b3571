"""AdaptersService: thin gRPC wrapper over AdapterAdmin."""

from __future__ import annotations

import asyncio

import grpc
from lorafleet.v1 import adapters_pb2, adapters_pb2_grpc

from server.engine.admin import AdapterAdmin
from server.grpc import convert
from server.grpc.inference import guarded


class AdaptersServicer(adapters_pb2_grpc.AdaptersServiceServicer):
    def __init__(self, admin: AdapterAdmin) -> None:
        self._admin = admin

    async def ListAdapters(
        self, request: adapters_pb2.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> adapters_pb2.ListAdaptersResponse:
        async def run() -> adapters_pb2.ListAdaptersResponse:
            views = await asyncio.to_thread(self._admin.list, request.tenant)
            return adapters_pb2.ListAdaptersResponse(adapters=[convert.adapter_pb(v) for v in views])

        return await guarded(context, run)

    async def GetAdapter(
        self, request: adapters_pb2.GetAdapterRequest, context: grpc.aio.ServicerContext
    ) -> adapters_pb2.GetAdapterResponse:
        async def run() -> adapters_pb2.GetAdapterResponse:
            view = await asyncio.to_thread(self._admin.get, request.adapter)
            return adapters_pb2.GetAdapterResponse(adapter=convert.adapter_pb(view))

        return await guarded(context, run)

    async def LoadAdapter(
        self, request: adapters_pb2.LoadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> adapters_pb2.LoadAdapterResponse:
        async def run() -> adapters_pb2.LoadAdapterResponse:
            key, tier = await asyncio.to_thread(self._admin.load, request.adapter)
            return adapters_pb2.LoadAdapterResponse(adapter=str(key), tier=convert.TIERS[tier])

        return await guarded(context, run)

    async def UnloadAdapter(
        self, request: adapters_pb2.UnloadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> adapters_pb2.UnloadAdapterResponse:
        async def run() -> adapters_pb2.UnloadAdapterResponse:
            key, freed = await asyncio.to_thread(self._admin.unload, request.adapter)
            return adapters_pb2.UnloadAdapterResponse(adapter=str(key), unloaded=freed)

        return await guarded(context, run)

    async def PinAdapter(
        self, request: adapters_pb2.PinAdapterRequest, context: grpc.aio.ServicerContext
    ) -> adapters_pb2.PinAdapterResponse:
        async def run() -> adapters_pb2.PinAdapterResponse:
            key = await asyncio.to_thread(self._admin.pin, request.adapter)
            return adapters_pb2.PinAdapterResponse(adapter=str(key))

        return await guarded(context, run)

    async def UnpinAdapter(
        self, request: adapters_pb2.UnpinAdapterRequest, context: grpc.aio.ServicerContext
    ) -> adapters_pb2.UnpinAdapterResponse:
        async def run() -> adapters_pb2.UnpinAdapterResponse:
            key = await asyncio.to_thread(self._admin.unpin, request.adapter)
            return adapters_pb2.UnpinAdapterResponse(adapter=str(key))

        return await guarded(context, run)

// Reference server for chat-bench: the same schema subset as Parley's gateway (sendMessage over HTTP,
// messages over graphql-transport-ws), on Apollo Server with an in-process PubSub. Usage: PORT=4000 node server.mjs
import http from 'node:http';
import { randomUUID } from 'node:crypto';
import express from 'express';
import { ApolloServer } from '@apollo/server';
import { expressMiddleware } from '@as-integrations/express5';
import { makeExecutableSchema } from '@graphql-tools/schema';
import { PubSub } from 'graphql-subscriptions';
import { WebSocketServer } from 'ws';
import { useServer } from 'graphql-ws/use/ws';

const typeDefs = `#graphql
  type Query { languages: [String!]! }
  type Mutation { sendMessage(chatId: ID!, text: String!, language: String): ChatMessage! }
  type Subscription { messages(chatId: ID!, languages: [String!]): ChatMessage! }
  type ChatMessage { id: ID! chatId: ID! seq: Int sender: String language: String! sourceLanguage: String!
                     original: Boolean! text: String! sentAt: String! }
`;

const pubsub = new PubSub();
let seq = 0;
const resolvers = {
  Query: { languages: () => [] },
  Mutation: {
    sendMessage: (_, { chatId, text, language }) => {
      const message = {
        id: randomUUID(), chatId, seq: ++seq, sender: null, language: language ?? 'en',
        sourceLanguage: language ?? 'en', original: true, text, sentAt: new Date().toISOString(),
      };
      pubsub.publish(`chat:${chatId}`, { messages: message });
      return message;
    },
  },
  Subscription: {
    messages: { subscribe: (_, { chatId }) => pubsub.asyncIterableIterator(`chat:${chatId}`) },
  },
};

const schema = makeExecutableSchema({ typeDefs, resolvers });
const app = express();
const httpServer = http.createServer(app);
const wsServer = new WebSocketServer({ server: httpServer, path: '/graphql' });
useServer({ schema }, wsServer);
const server = new ApolloServer({ schema });
await server.start();
app.use('/graphql', express.json(), expressMiddleware(server));
app.get('/healthz', (_, res) => res.send('ok'));
const port = Number(process.env.PORT ?? 4000);
httpServer.listen(port, '127.0.0.1', () => console.log(`apollo reference on http://127.0.0.1:${port}/graphql`));
